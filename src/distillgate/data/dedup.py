"""Exact and near-duplicate detection: word n-gram shingles, MinHash LSH (rensa) for candidates, exact Jaccard check.

Texts are lower-cased and split into ``\\w+`` words; the shingles are word ``ngram``-grams (texts with fewer words
use their words). Two texts are near-duplicates when the Jaccard similarity of their shingle sets is at least
``threshold``. MinHash (``num_perm`` permutations) with LSH (``bands`` bands of ``num_perm / bands`` rows) proposes
candidate pairs; every candidate is verified with the exact Jaccard, so LSH only costs recall, never precision. A
pair with similarity s becomes a candidate with probability ``1 - (1 - s**r)**b``; with the defaults (128
permutations, 32 bands of 4 rows) that is 0.99999995 at s=0.8 and 0.87 at s=0.5. Clusters are the connected
components of verified pairs (single linkage); a cluster's id is its earliest member.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import rensa

from distillgate.data.config import DedupConfig

_WORD = re.compile(r"\w+")
CHUNK = 65536


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, ngram: int) -> list[str]:
    tokens = _WORD.findall(text.lower())
    if len(tokens) <= ngram:
        return [" ".join(tokens)] if tokens else [text.strip().lower()]
    if ngram == 1:
        return tokens
    if ngram == 2:
        return [a + " " + b for a, b in itertools.pairwise(tokens)]
    return [" ".join(tokens[i : i + ngram]) for i in range(len(tokens) - ngram + 1)]


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def exact_key(text: str) -> bytes:
    """Key for exact duplicates: the text's lower-cased words (case, spacing and punctuation ignored)."""
    return hashlib.blake2b(" ".join(_WORD.findall(text.lower())).encode(), digest_size=16).digest()


def exact_groups(texts: Sequence[str]) -> list[int]:
    """For each text, the index of the first text with the same exact key (itself when it is the first)."""
    first: dict[bytes, int] = {}
    out: list[int] = []
    for i, text in enumerate(texts):
        out.append(first.setdefault(exact_key(text), i))
    return out


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


def _new_lsh(cfg: DedupConfig) -> rensa.RMinHashLSH:
    return rensa.RMinHashLSH(cfg.threshold, cfg.num_perm, cfg.bands)


@dataclass
class ClusterResult:
    clusters: list[int]  # representative (earliest) index per text
    verified_pairs: int
    candidate_pairs: int


def near_duplicate_clusters(texts: Sequence[str], cfg: DedupConfig) -> ClusterResult:
    """Cluster ``texts`` by near-duplicate similarity (exact Jaccard of shingle sets >= threshold)."""
    n = len(texts)
    uf = _UnionFind(n)
    lsh = _new_lsh(cfg)
    cache: dict[int, set[str]] = {}
    verified = candidates = 0
    for start in range(0, n, CHUNK):
        chunk = [shingles(t, cfg.ngram) for t in texts[start : start + CHUNK]]
        minhashes = rensa.RMinHash.from_token_sets(chunk, cfg.num_perm, cfg.seed)
        lsh.insert_many(minhashes, start)
        found = lsh.query_all(minhashes)
        for offset, keys in enumerate(found):
            i = start + offset
            for j in keys:
                if j >= i:
                    continue
                candidates += 1
                if uf.find(i) == uf.find(j):
                    continue
                a = set(chunk[offset])
                b = cache.get(j)
                if b is None:
                    b = set(chunk[j - start]) if j >= start else set(shingles(texts[j], cfg.ngram))
                    if len(cache) > 200_000:
                        cache.clear()
                    cache[j] = b
                if jaccard(a, b) >= cfg.threshold:
                    uf.union(i, j)
                    verified += 1
    return ClusterResult([uf.find(i) for i in range(n)], verified, candidates)


@dataclass(frozen=True)
class Neighbour:
    index: int  # index into the reference texts
    similarity: float


class NearIndex:
    """An LSH index over reference texts; ``neighbours`` finds references with Jaccard >= threshold (exact)."""

    def __init__(self, references: Sequence[str], cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.references = references
        self.exact: dict[bytes, int] = {}
        for i, text in enumerate(references):
            self.exact.setdefault(exact_key(text), i)
        self.lsh = _new_lsh(cfg)
        for start in range(0, len(references), CHUNK):
            chunk = [shingles(t, cfg.ngram) for t in references[start : start + CHUNK]]
            self.lsh.insert_many(rensa.RMinHash.from_token_sets(chunk, cfg.num_perm, cfg.seed), start)

    def neighbours(self, texts: Sequence[str], *, best_only: bool = True) -> list[list[Neighbour]]:
        """For each text, its verified neighbours (best first; only the best one when ``best_only``)."""
        out: list[list[Neighbour]] = []
        for start in range(0, len(texts), CHUNK):
            chunk = [shingles(t, self.cfg.ngram) for t in texts[start : start + CHUNK]]
            found = self.lsh.query_all(rensa.RMinHash.from_token_sets(chunk, self.cfg.num_perm, self.cfg.seed))
            for tokens, keys in zip(chunk, found, strict=True):
                mine = set(tokens)
                hits = []
                for j in keys:
                    sim = jaccard(mine, set(shingles(self.references[j], self.cfg.ngram)))
                    if sim >= self.cfg.threshold:
                        hits.append(Neighbour(j, sim))
                hits.sort(key=lambda h: (-h.similarity, h.index))
                out.append(hits[:1] if best_only else hits)
        return out
