"""Exact and near-duplicate detection: word n-gram shingles, MinHash + LSH banding for candidates, exact Jaccard check.

Texts are lower-cased and split into ``\\w+`` words. Exact duplicates share the same word sequence (case, spacing and
punctuation ignored). Near-duplicates: the shingles are word ``ngram``-grams (a text with fewer words is one
shingle), hashed to 64 bits (words are hashed by ``rensa``'s stable token hash, n-grams combined in numpy). Two
texts are near-duplicates when the Jaccard similarity of their shingle sets is at least ``threshold``.

MinHash signatures (``num_perm`` seeded 32-bit permutations ``h = ((x ^ b) * a) mod 2^32; h ^= h >> 15``) are cut into ``bands`` bands of
``r = num_perm / bands`` rows; texts sharing a band are candidates. A pair with similarity s becomes a candidate
with probability ``1 - (1 - s**r)**bands``; with the defaults (64 permutations, 16 bands of 4) that is 0.9998 at
s=0.8 and 0.64 at s=0.5. Every candidate pair is verified with the exact Jaccard of the shingle-hash sets, so the
sketch only costs recall, never precision. Within one band bucket all pairs are checked when the bucket holds at
most ``MAX_BUCKET_PAIRS_SIZE`` texts, else each member is checked against the bucket's first member. Clusters are
the connected components of verified pairs (single linkage); a cluster is named by its earliest member.

Everything is deterministic for a given seed and linear in memory (about 0.5 KB per text with the defaults).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import rensa

from distillgate.data.config import DedupConfig

_WORD = re.compile(r"\w+")
CHUNK_ROWS = 4096
MAX_BUCKET_PAIRS_SIZE = 16
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5,
                 0x85EBCA77C2B2AE63], dtype=np.uint64)

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


def exact_key(text: str) -> bytes:
    """Key for exact duplicates: the text's lower-cased words (case, spacing and punctuation ignored)."""
    return hashlib.blake2b(" ".join(_WORD.findall(text.lower())).encode(), digest_size=16).digest()


def exact_groups(texts: Sequence[str]) -> list[int]:
    """For each text, the index of the first text with the same exact key (itself when it is the first)."""
    first: dict[bytes, int] = {}
    return [first.setdefault(exact_key(text), i) for i, text in enumerate(texts)]


@dataclass
class Sketches:
    """Per text: exact key, shingle hashes (flat, with offsets) and a MinHash signature row."""

    exact_keys: list[bytes]
    offsets: npt.NDArray[np.int64]  # (N+1,)
    shingle_hashes: U64  # (total shingles,)
    signatures: npt.NDArray[np.uint32]  # (N, num_perm)

    def shingle_set(self, i: int) -> set[int]:
        return set(self.shingle_hashes[self.offsets[i] : self.offsets[i + 1]].tolist())

    def __len__(self) -> int:
        return len(self.exact_keys)


def _perms(cfg: DedupConfig) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
    rng = np.random.default_rng(cfg.seed)
    a = (rng.integers(0, 2**31, size=cfg.num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)).astype(np.uint32)
    b = rng.integers(0, 2**32, size=cfg.num_perm, dtype=np.uint32)
    return a, b


def _chunk_shingles(texts: Sequence[str], ngram: int) -> tuple[list[bytes], list[int], U64]:
    """Exact keys, shingle counts and flat shingle hashes for a chunk of texts."""
    word_lists = [_WORD.findall(t.lower()) for t in texts]
    keys = [hashlib.blake2b(" ".join(w).encode(), digest_size=16).digest() for w in word_lists]
    fallback = [w or [t.strip().lower()] for t, w in zip(texts, word_lists, strict=True)]
    hashed = rensa.RMinHash.hash_token_sets(fallback)
    lengths = np.fromiter((len(h) for h in hashed), dtype=np.int64, count=len(hashed))
    flat = np.fromiter(itertools.chain.from_iterable(hashed), dtype=np.uint64, count=int(lengths.sum()))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    n = ngram
    total = len(flat)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(total, dtype=np.int64) - starts[row_of]
    counts = np.where(lengths >= n, lengths - n + 1, 1)
    out_off = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    out = np.empty(int(counts.sum()), dtype=np.uint64)
    with np.errstate(over="ignore"):
        if total >= n:
            # n-gram hash at position p: sum_j W[p + j] * MIX[j] (mod 2^64), where the n-gram stays in its row
            span = total - n + 1
            combined = flat[:span] * _MIX[0]
            for j in range(1, n):
                combined = combined + flat[j : span + j] * _MIX[j]
            valid = np.flatnonzero(pos[:span] <= lengths[row_of[:span]] - n)
            out[out_off[row_of[valid]] + pos[valid]] = combined[valid]
        short = lengths < n
        if short.any():  # shorter than one n-gram: all its words form one shingle
            weighted = flat * _MIX[np.minimum(pos, len(_MIX) - 1)]
            sums = np.add.reduceat(weighted, starts)
            out[out_off[short]] = sums[short]
    return keys, counts.tolist(), out


def sketch(texts: Sequence[str], cfg: DedupConfig) -> Sketches:
    """Exact keys, shingle hashes and MinHash signatures for ``texts`` (chunked; memory linear in N)."""
    a, b = _perms(cfg)
    keys: list[bytes] = []
    all_counts: list[int] = []
    hash_parts: list[U64] = []
    sig_parts: list[npt.NDArray[np.uint32]] = []
    for start in range(0, len(texts), CHUNK_ROWS):
        ck, counts, flat = _chunk_shingles(texts[start : start + CHUNK_ROWS], cfg.ngram)
        keys.extend(ck)
        all_counts.extend(counts)
        hash_parts.append(flat)
        local = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        folded = (flat ^ (flat >> np.uint64(32))).astype(np.uint32)
        with np.errstate(over="ignore"):
            # permutation k: h = ((x ^ b_k) * a_k) mod 2^32, then h ^= h >> 15 (a bijection of 32-bit values)
            permuted = folded[None, :] ^ b[:, None]
            permuted *= a[:, None]
            permuted ^= permuted >> np.uint32(15)
        sig_parts.append(np.minimum.reduceat(permuted, local, axis=1).T)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    if all_counts:
        np.cumsum(all_counts, out=offsets[1:])
    return Sketches(
        exact_keys=keys,
        offsets=offsets,
        shingle_hashes=np.concatenate(hash_parts) if hash_parts else np.zeros(0, dtype=np.uint64),
        signatures=np.ascontiguousarray(np.concatenate(sig_parts)) if sig_parts else np.zeros((0, cfg.num_perm), dtype=np.uint32),
    )


def _band_keys(signatures: npt.NDArray[np.uint32], band: int, rows: int) -> U64:
    block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
    key = np.full(block.shape[0], np.uint64(band), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            key = (key ^ block[:, j]) * _MIX[j % len(_MIX)]
            key ^= key >> np.uint64(29)
    return key


def candidate_pairs(signatures: npt.NDArray[np.uint32], cfg: DedupConfig) -> npt.NDArray[np.int64]:
    """Unique (i, j) index pairs, i < j, that share at least one LSH band. Shape (M, 2)."""
    n = signatures.shape[0]
    rows = cfg.num_perm // cfg.bands
    found: list[npt.NDArray[np.int64]] = []
    for band in range(cfg.bands):
        keys = _band_keys(signatures, band, rows)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        same = sorted_keys[1:] == sorted_keys[:-1]
        if not same.any():
            continue
        # runs of equal keys; pairs are generated per run size, vectorised
        starts = np.flatnonzero(np.concatenate(([True], ~same)))
        sizes = np.diff(np.concatenate((starts, [n])))
        for size in np.unique(sizes[sizes > 1]).tolist():
            run_starts = starts[sizes == size]
            members = np.sort(order[run_starts[:, None] + np.arange(size)[None, :]], axis=1)
            if size <= MAX_BUCKET_PAIRS_SIZE:
                ii, jj = np.triu_indices(size, k=1)
            else:
                ii, jj = np.zeros(size - 1, dtype=np.int64), np.arange(1, size)
            found.append(np.stack((members[:, ii].ravel(), members[:, jj].ravel()), axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    packed = np.unique(pairs[:, 0] * (n + 1) + pairs[:, 1])
    return np.stack((packed // (n + 1), packed % (n + 1)), axis=1)


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
