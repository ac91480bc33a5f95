"""Sketches of every row's input, spilled to disk as the rows stream past: what lets a build outgrow memory.

For row ``p`` (in stream order) the spill keeps, with the ``dedup`` settings:

- in memory: the exact key (8 bytes) and the end offset of its shingles (8 bytes) — 16 bytes a row;
- on disk, in a private temporary directory: its shingle hashes (8 bytes each, ``shingles.u64``) and one LSH band
  key per band (8 bytes each, ``band-<b>.u64``; 128 bytes a row with the default 16 bands).

A later step reads one band at a time (``band``: 8 bytes a row while it is held) and single rows' shingle sets with
``pread`` (``shingle_set``), so nothing is memory-mapped and the resident set stays what the code holds.
The values are those of ``distillgate.data.dedup.sketch`` (same tokeniser, shingles, permutations and band keys).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from distillgate import minhash
from distillgate.data.config import DedupConfig
from distillgate.data.dedup import CHUNK_ROWS, jaccard, permutations

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


class SketchSpill:
    """Append texts with ``add``; after ``finish``, read ``exact_keys``, ``band(b)`` and ``shingle_set(p)``."""

    def __init__(self, cfg: DedupConfig, tmp_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.rows_per_band = cfg.num_perm // cfg.bands
        self.dir = Path(tempfile.mkdtemp(prefix="distillgate-build-", dir=tmp_dir))
        self._perms = permutations(cfg)
        self._shingles: BinaryIO = (self.dir / "shingles.u64").open("wb")
        self._bands: list[BinaryIO] = [(self.dir / f"band-{b}.u64").open("wb") for b in range(cfg.bands)]
        self._keys: list[U64] = []
        self._counts: list[npt.NDArray[np.int32]] = []
        self._fd: int | None = None
        self.exact_keys: U64 = np.zeros(0, dtype=np.uint64)
        self.offsets: I64 = np.zeros(1, dtype=np.int64)

    def add(self, texts: Sequence[str]) -> None:
        for start in range(0, len(texts), CHUNK_ROWS):
            keys, counts, flat = minhash.chunk_shingles(texts[start : start + CHUNK_ROWS], self.cfg.ngram)
            sigs = minhash.signatures(flat, counts, self._perms)
            self._keys.append(np.asarray(keys, dtype=np.uint64))
            self._counts.append(np.asarray(counts, dtype=np.int32))
            self._shingles.write(flat.tobytes())
            for b, fh in enumerate(self._bands):
                fh.write(minhash.band_keys(sigs, b, self.rows_per_band).tobytes())

    def finish(self) -> None:
        """Close the writers; the per-row keys and offsets become arrays."""
        self._shingles.close()
        for fh in self._bands:
            fh.close()
        self.exact_keys = np.concatenate(self._keys) if self._keys else np.zeros(0, dtype=np.uint64)
        counts = np.concatenate(self._counts) if self._counts else np.zeros(0, dtype=np.int32)
        self._keys, self._counts = [], []
        self.offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offsets[1:])
        self._fd = os.open(self.dir / "shingles.u64", os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.exact_keys)

    def band(self, b: int) -> U64:
        return np.fromfile(self.dir / f"band-{b}.u64", dtype=np.uint64)

    def shingle_set(self, p: int) -> set[int]:
        assert self._fd is not None, "finish() first"
        start, end = int(self.offsets[p]), int(self.offsets[p + 1])
        data = os.pread(self._fd, (end - start) * 8, start * 8)
        return set(np.frombuffer(data, dtype=np.uint64).tolist())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for fh in (self._shingles, *self._bands):
            fh.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SketchSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BandKeys = Callable[[int], U64]


def spilled_band_keys(spill: SketchSpill, items: npt.NDArray[np.signedinteger[Any]], prefix: Sequence[U64] | None = None) -> BandKeys:
    """Band ``b``'s keys of ``items`` (row positions in ``spill``), after ``prefix[b]`` when given."""

    def keys(b: int) -> U64:
        found = spill.band(b)[items]
        return np.concatenate((prefix[b], found)) if prefix is not None else found

    return keys


def _roots(parent: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    root = parent.copy()
    while True:
        up = root[root]
        if np.array_equal(up, root):
            return root
        root = up


def clusters(keys: BandKeys, bands: int, n: int, set_of: Callable[[int], set[int]],
             threshold: float) -> npt.NDArray[np.int32]:
    """Near-duplicate clusters of ``n`` items: for each, the earliest item of its connected component of verified
    candidate pairs (exact Jaccard >= threshold). The same components as ``dedup.cluster_sketches``: the verified
    pairs do not depend on the order they are checked in, and pairs already joined are skipped either way."""
    parent = np.arange(n, dtype=np.int32)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = int(parent[root])
        while parent[i] != root:
            parent[i], i = root, int(parent[i])
        return root

    for b in range(bands):
        pairs = minhash.band_pairs(keys(b))
        if not len(pairs):
            continue
        root = _roots(parent)
        pairs = pairs[root[pairs[:, 0]] != root[pairs[:, 1]]]
        if len(pairs) > 1:
            pairs = np.unique(pairs, axis=0)
        for i, j in pairs.tolist():
            ri, rj = find(i), find(j)
            if ri == rj:
                continue
            if jaccard(set_of(i), set_of(j)) >= threshold:
                parent[max(ri, rj)] = min(ri, rj)
    return _roots(parent)


def best_neighbours(keys: BandKeys, bands: int, n_ref: int, n_query: int, set_of: Callable[[int], set[int]],
                    threshold: float) -> tuple[npt.NDArray[np.float64], I64]:
    """For each query (items ``n_ref ..``), its best reference (items ``.. n_ref``) at Jaccard >= threshold.

    Returns (similarity, reference index) per query; (-1.0, -1) for none. Best: highest similarity, then lowest
    reference index — what ``dedup.NearIndex.neighbours`` puts first.
    """
    best_sim = np.full(n_query, -1.0)
    best_ref = np.full(n_query, -1, dtype=np.int64)
    for b in range(bands):
        pairs = minhash.band_pairs(keys(b))
        cross = pairs[(pairs[:, 0] < n_ref) & (pairs[:, 1] >= n_ref)]
        for ref, q in cross.tolist():
            qi = q - n_ref
            sim = jaccard(set_of(ref), set_of(q))
            if sim >= threshold and (sim > best_sim[qi] or (sim == best_sim[qi] and ref < best_ref[qi])):
                best_sim[qi], best_ref[qi] = sim, ref
    return best_sim, best_ref
