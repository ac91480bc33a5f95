"""Exact and near-duplicate detection: word n-gram shingles, MinHash + LSH banding for candidates, exact Jaccard check.

Texts are lower-cased and split into words (maximal runs of ASCII letters, digits, ``_`` and non-ASCII
characters), tokenised and hashed in numpy over the UTF-8 bytes. Exact duplicates share the same word sequence
(case, spacing and punctuation ignored). Near-duplicates: the shingles are word ``ngram``-grams (a text with fewer
words is one shingle), hashed to 64 bits (a polynomial hash of each word's bytes, n-grams combined). Two texts are
near-duplicates when the Jaccard similarity of their shingle sets is at least ``threshold``.

MinHash signatures (``num_perm`` seeded 32-bit permutations ``h = ((x ^ b) * a) mod 2^32; h ^= h >> 15``) are cut
into ``bands`` bands of ``r = num_perm / bands`` rows; texts sharing a band are candidates. A pair with similarity s becomes a candidate
with probability ``1 - (1 - s**r)**bands``; with the defaults (64 permutations, 16 bands of 4) that is 0.9998 at
s=0.8 and 0.64 at s=0.5. Every candidate pair is verified with the exact Jaccard of the shingle-hash sets, so the
sketch only costs recall, never precision. Within one band bucket all pairs are checked when the bucket holds at
most ``MAX_BUCKET_PAIRS_SIZE`` texts, else each member is checked against the bucket's first member. Clusters are
the connected components of verified pairs (single linkage); a cluster is named by its earliest member.

Everything is deterministic for a given seed and linear in memory (about 0.5 KB per text with the defaults).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from distillgate import minhash
from distillgate.data.config import DedupConfig

# A word is a maximal run of ASCII letters, digits, "_" and non-ASCII characters (after lower-casing); the
# vectorised tokeniser in ``distillgate.minhash`` reads the same definition from UTF-8 bytes.
_WORD = re.compile("[0-9a-z_\u0080-\U0010ffff]+")
CHUNK_ROWS = 4096

U64 = npt.NDArray[np.uint64]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, ngram: int) -> list[str]:
    """The shingles of ``text`` as strings (the hashed form used for dedup has the same sets)."""
    tokens = _WORD.findall(text.lower())
    if len(tokens) <= ngram:
        return [" ".join(tokens)] if tokens else [text.strip().lower()]
    if ngram == 1:
        return tokens
    if ngram == 2:
        return [a + " " + b for a, b in itertools.pairwise(tokens)]
    return [" ".join(tokens[i : i + ngram]) for i in range(len(tokens) - ngram + 1)]


def jaccard(a: set[str] | set[int], b: set[str] | set[int]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)  # type: ignore[operator]
    return inter / (len(a) + len(b) - inter)


def exact_groups(texts: Sequence[str]) -> list[int]:
    """For each text, the index of the first text with the same words (case, spacing, punctuation ignored)."""
    first: dict[int, int] = {}
    keys = sketch(texts, DedupConfig(num_perm=8, bands=1)).exact_keys
    return [first.setdefault(key, i) for i, key in enumerate(keys)]


@dataclass
class Sketches:
    """Per text: exact key, shingle hashes (flat, with offsets) and a MinHash signature row."""

    exact_keys: list[int]  # 64-bit hash of the word sequence
    offsets: npt.NDArray[np.int64]  # (N+1,)
    shingle_hashes: U64  # (total shingles,)
    signatures: npt.NDArray[np.uint32]  # (N, num_perm)

    def shingle_set(self, i: int) -> set[int]:
        return set(self.shingle_hashes[self.offsets[i] : self.offsets[i + 1]].tolist())

    def __len__(self) -> int:
        return len(self.exact_keys)


def sketch(texts: Sequence[str], cfg: DedupConfig) -> Sketches:
    """Exact keys, shingle hashes and MinHash signatures for ``texts`` (chunked; memory linear in N)."""
    perms = permutations(cfg)
    keys: list[int] = []
    all_counts: list[int] = []
    hash_parts: list[U64] = []
    sig_parts: list[npt.NDArray[np.uint32]] = []
    for start in range(0, len(texts), CHUNK_ROWS):
        ck, counts, flat = minhash.chunk_shingles(texts[start : start + CHUNK_ROWS], cfg.ngram)
        keys.extend(ck)
        all_counts.extend(counts)
        hash_parts.append(flat)
        sig_parts.append(minhash.signatures(flat, counts, perms))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    if all_counts:
        np.cumsum(all_counts, out=offsets[1:])
    return Sketches(
        exact_keys=keys,
        offsets=offsets,
        shingle_hashes=np.concatenate(hash_parts) if hash_parts else np.zeros(0, dtype=np.uint64),
        signatures=np.ascontiguousarray(np.concatenate(sig_parts)) if sig_parts else np.zeros((0, cfg.num_perm), dtype=np.uint32),
    )


def permutations(cfg: DedupConfig) -> minhash.Permutations:
    return minhash.Permutations.make(cfg.num_perm, cfg.seed)


def candidate_pairs(signatures: npt.NDArray[np.uint32], cfg: DedupConfig) -> npt.NDArray[np.int64]:
    """Unique (i, j) index pairs, i < j, that share at least one LSH band. Shape (M, 2)."""
    return minhash.candidate_pairs(signatures, cfg.bands)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


@dataclass
class ClusterResult:
    clusters: list[int]  # representative (earliest) index per text
    verified_pairs: int
    candidate_pairs: int


def cluster_sketches(sk: Sketches, cfg: DedupConfig, subset: Sequence[int] | None = None) -> ClusterResult:
    """Near-duplicate clusters over ``subset`` (indices into ``sk``; default all). Returns per-subset-position reps."""
    index = np.arange(len(sk)) if subset is None else np.asarray(subset, dtype=np.int64)
    pairs = candidate_pairs(sk.signatures[index], cfg)
    uf = _UnionFind(len(index))
    verified = 0
    cache: dict[int, set[int]] = {}

    def shingle_set(pos: int) -> set[int]:
        found = cache.get(pos)
        if found is None:
            found = cache[pos] = sk.shingle_set(int(index[pos]))
        return found

    for i, j in pairs.tolist():
        if uf.find(i) == uf.find(j):
            continue
        if jaccard(shingle_set(i), shingle_set(j)) >= cfg.threshold:
            uf.union(i, j)
            verified += 1
    return ClusterResult([uf.find(i) for i in range(len(index))], verified, len(pairs))


def near_duplicate_clusters(texts: Sequence[str], cfg: DedupConfig) -> ClusterResult:
    """Cluster ``texts`` by near-duplicate similarity (exact Jaccard of shingle sets >= threshold)."""
    return cluster_sketches(sketch(texts, cfg), cfg)


@dataclass(frozen=True)
class Neighbour:
    index: int  # index into the reference texts
    similarity: float


class NearIndex:
    """Reference texts (an eval set, the train split); ``neighbours`` finds those at Jaccard >= threshold."""

    def __init__(self, references: Sequence[str], cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.references = references
        self.sketches = sketch(references, cfg)

    def neighbours(self, texts: Sequence[str], *, best_only: bool = True) -> list[list[Neighbour]]:
        """For each text, its verified reference neighbours (best first; only the best one when ``best_only``)."""
        queries = sketch(texts, self.cfg)
        n_ref = len(self.sketches)
        both = np.concatenate((self.sketches.signatures, queries.signatures))
        pairs = candidate_pairs(both, self.cfg)
        cross = pairs[(pairs[:, 0] < n_ref) & (pairs[:, 1] >= n_ref)]
        hits: list[list[Neighbour]] = [[] for _ in texts]
        query_sets: dict[int, set[int]] = {}
        for ref, q in cross.tolist():
            qi = q - n_ref
            mine = query_sets.get(qi)
            if mine is None:
                mine = query_sets[qi] = queries.shingle_set(qi)
            sim = jaccard(mine, self.sketches.shingle_set(ref))
            if sim >= self.cfg.threshold:
                hits[qi].append(Neighbour(ref, sim))
        for item in hits:
            item.sort(key=lambda h: (-h.similarity, h.index))
            if best_only:
                del item[1:]
        return hits
