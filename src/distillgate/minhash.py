"""MinHash over 64-bit item hashes, word shingles hashed in numpy, and LSH banding: the one implementation.

Both the dataset builder (``distillgate.data.dedup``: near-duplicate clusters, decontamination, the leakage check)
and the extraction monitor (``distillgate.extraction.features``: prompt signatures) use this module; it imports
only numpy so that both can, whatever their place in the layering.

- ``token_hashes`` / ``chunk_shingles``: lower-cased words (maximal runs of ASCII letters, digits, ``_`` and
  non-ASCII characters) hashed from the UTF-8 bytes with a polynomial hash, then word ``ngram``-gram shingles
  (a text with fewer words is one shingle) and an exact key of the word sequence, vectorised over a chunk of texts.
- ``Permutations`` / ``signatures``: ``num_perm`` seeded 32-bit permutations of the folded item hash,
  ``h = ((x ^ b) * a) mod 2^32; h ^= h >> 15`` (a bijection), minimum per set: one (N, num_perm) uint32 block for
  a chunk of sets. ``ItemRows``: the same signature of one set from each item's permuted values kept for the
  items seen recently (the extraction monitor's per-request signature, over words it has mostly seen before).
- ``band_keys`` / ``band_pairs`` / ``candidate_pairs``: signatures cut into ``bands`` bands of ``r`` rows; sets
  sharing a band key are candidates (all pairs of a bucket of at most ``MAX_BUCKET_PAIRS_SIZE`` members, else
  every member with the bucket's first).

Why not ``rensa`` or ``datasketch``: docs/dataset.md ("MinHash: one implementation") gives the measurements.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True
_P = np.uint64(0x100000001B3)  # odd: invertible mod 2^64
_P_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
MAX_BUCKET_PAIRS_SIZE = 16
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5,
                 0x85EBCA77C2B2AE63], dtype=np.uint64)

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]


_SHIFT32 = np.uint64(32)
_SHIFT15 = np.uint32(15)


@dataclass(frozen=True)
class Permutations:
    """``num_perm`` seeded permutations of 32-bit values: ``h = ((x ^ b) * a) mod 2^32; h ^= h >> 15``."""

    a: U32  # odd multipliers
    b: U32

    @classmethod
    def make(cls, num_perm: int, seed: int) -> Permutations:
        rng = np.random.default_rng(seed)
        a = (rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)).astype(np.uint32)
        b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
        return cls(a, b)

    def __len__(self) -> int:
        return len(self.a)

    @cached_property
    def a_column(self) -> U32:
        return self.a[:, None]

    @cached_property
    def b_column(self) -> U32:
        return self.b[:, None]


def signatures(flat: U64, counts: Sequence[int] | I64, perms: Permutations) -> U32:
    """MinHash signatures of consecutive sets of item hashes (``counts[i]`` items each, every count >= 1).

    Shape (len(counts), num_perm). The 64-bit hashes are folded to 32 bits before permuting.
    """
    local = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    folded = (flat ^ (flat >> np.uint64(32))).astype(np.uint32)
    with np.errstate(over="ignore"):
        # permutation k: h = ((x ^ b_k) * a_k) mod 2^32, then h ^= h >> 15 (a bijection of 32-bit values)
        permuted = folded[None, :] ^ perms.b[:, None]
        permuted *= perms.a[:, None]
        permuted ^= permuted >> np.uint32(15)
    return np.ascontiguousarray(np.minimum.reduceat(permuted, local, axis=1).T)


def signature(hashes: U64, perms: Permutations) -> U32:
    """The MinHash signature (num_perm uint32 values) of one non-empty set of item hashes: ``signatures`` of one
    set, with fewer numpy calls (the extraction monitor computes one per request)."""
    folded = (hashes ^ (hashes >> _SHIFT32)).astype(np.uint32)
    permuted = folded ^ perms.b_column  # (num_perm, W); array arithmetic wraps without warnings
    permuted *= perms.a_column
    permuted ^= permuted >> _SHIFT15
    one: U32 = permuted.min(axis=1)
    return one


def _permuted(hashes: U64, perms: Permutations) -> U32:
    """Each item's permuted values: shape (len(hashes), num_perm), one row per item (the rows ``signature`` takes
    the minimum of)."""
    folded = (hashes ^ (hashes >> _SHIFT32)).astype(np.uint32)
    rows = folded[:, None] ^ perms.b  # (W, num_perm); array arithmetic wraps without warnings
    rows *= perms.a
    rows ^= rows >> _SHIFT15
    return rows


class ItemRows:
    """``signature`` of one set as the minimum of its items' rows (``_permuted``), each row kept for the last
    ``capacity`` distinct items: a request whose words were seen before costs one gather and one reduction instead
    of permuting every word again (about a quarter of the instructions for a short prompt). Equal to ``signature``
    for every set, whatever is kept.

    Thread-safe: rows are only appended, each before its index entry, so a reader never finds an entry whose row is
    not written; a full table is replaced by a fresh one (readers keep the one they took)."""

    def __init__(self, perms: Permutations, capacity: int = 16384) -> None:
        self.perms = perms
        self.capacity = capacity
        self._lock = threading.Lock()
        self._table: tuple[dict[int, int], U32] = ({}, np.empty((capacity, len(perms)), dtype=np.uint32))

    def signature(self, hashes: Sequence[int]) -> U32:
        """The MinHash signature of the non-empty set of 64-bit item hashes ``hashes`` (Python ints)."""
        index, rows = self._table
        try:
            at = [index[h] for h in hashes]
        except KeyError:
            at, rows = self._add(hashes)
            if not at:  # a set larger than the table: computed directly
                return signature(np.array(hashes, dtype=np.uint64), self.perms)
        one: U32 = rows.take(at, axis=0).min(axis=0)
        return one

    def _add(self, hashes: Sequence[int]) -> tuple[list[int], U32]:
        with self._lock:
            index, rows = self._table
            new = [h for h in dict.fromkeys(hashes) if h not in index]
            if len(index) + len(new) > self.capacity:
                distinct = list(dict.fromkeys(hashes))
                if len(distinct) > self.capacity:
                    return [], rows
                index, rows = {}, np.empty_like(rows)
                new = distinct
            start = len(index)
            rows[start:start + len(new)] = _permuted(np.array(new, dtype=np.uint64), self.perms)
            for offset, h in enumerate(new):
                index[h] = start + offset
            self._table = (index, rows)
            return [index[h] for h in hashes], rows


def _mix(h: U64) -> U64:
    """A 64-bit finaliser (xorshift-multiply) so that every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def token_hashes(texts: Sequence[str]) -> tuple[U64, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Word hashes of a chunk of texts, vectorised over its UTF-8 bytes.

    Returns (hashes in text order, row of each hash, number of hashes per row). A text without any word gets one
    hash of its whole content instead.
    """
    joined = "\x00".join(t.replace("\x00", " ") for t in texts).lower().encode("utf-8")
    buf = np.frombuffer(joined, dtype=np.uint8)
    n = len(buf)
    with np.errstate(over="ignore"):
        powers = np.empty(n + 1, dtype=np.uint64)
        powers[0] = 1
        powers[1:] = _P
        np.cumprod(powers, out=powers)  # P^i mod 2^64
        inverse = np.empty(n + 1, dtype=np.uint64)
        inverse[0] = 1
        inverse[1:] = _P_INV
        np.cumprod(inverse, out=inverse)
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum((buf.astype(np.uint64) + np.uint64(1)) * powers[:n], out=prefix[1:])

        def span_hash(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> U64:
            return _mix((prefix[b] - prefix[a]) * inverse[a] + (b - a).astype(np.uint64))

        word = _WORD_BYTE[buf]
        edges = np.diff(np.concatenate(([False], word, [False])).astype(np.int8))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        seps = np.flatnonzero(buf == 0)
        row_start = np.concatenate(([0], seps + 1))
        row_end = np.concatenate((seps, [n]))
        token_row = np.searchsorted(seps, starts)  # separators before the token = its row
        hashes = span_hash(starts, ends)
        per_row = np.bincount(token_row, minlength=len(texts)).astype(np.int64)
        empty = np.flatnonzero(per_row == 0)
        if len(empty):  # no words: the whole text is the one token
            hashes = np.concatenate((hashes, span_hash(row_start[empty], row_end[empty])))
            token_row = np.concatenate((token_row, empty))
            order = np.argsort(token_row, kind="stable")
            hashes, token_row = hashes[order], token_row[order]
            per_row[empty] = 1
    return hashes, token_row, per_row


def chunk_shingles(texts: Sequence[str], ngram: int) -> tuple[list[int], list[int], U64]:
    """Exact keys, shingle counts and flat shingle hashes for a chunk of texts."""
    flat, row_of, lengths = token_hashes(texts)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    n = ngram
    total = len(flat)
    pos = np.arange(total, dtype=np.int64) - starts[row_of]
    with np.errstate(over="ignore"):
        # exact key: the word sequence, position-weighted, plus its length
        weights = _mix(pos.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
        keys = _mix(np.add.reduceat(flat * weights, starts) + lengths.astype(np.uint64))
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
    return keys.tolist(), counts.tolist(), out


def band_keys(signatures: U32, band: int, rows: int) -> U64:
    """One 64-bit key per signature for band ``band`` (its ``rows`` values, mixed with the band number)."""
    block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
    key = np.full(block.shape[0], np.uint64(band), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            key = (key ^ block[:, j]) * _MIX[j % len(_MIX)]
            key ^= key >> np.uint64(29)
    return key


def band_pairs(keys: U64) -> I64:
    """(i, j) index pairs, i < j, of items sharing a key in one band (may repeat across bands). Shape (M, 2).

    A bucket of at most ``MAX_BUCKET_PAIRS_SIZE`` items gives all its pairs; a larger one pairs every member with
    its first (lowest index) member.
    """
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    if not same.any():
        return np.zeros((0, 2), dtype=np.int64)
    # runs of equal keys; pairs are generated per run size, vectorised
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    sizes = np.diff(np.concatenate((starts, [n])))
    found: list[I64] = []
    for size in np.unique(sizes[sizes > 1]).tolist():
        run_starts = starts[sizes == size]
        members = np.sort(order[run_starts[:, None] + np.arange(size)[None, :]], axis=1)
        if size <= MAX_BUCKET_PAIRS_SIZE:
            ii, jj = np.triu_indices(size, k=1)
        else:
            ii, jj = np.zeros(size - 1, dtype=np.int64), np.arange(1, size)
        found.append(np.stack((members[:, ii].ravel(), members[:, jj].ravel()), axis=1))
    return np.concatenate(found).astype(np.int64)


def candidate_pairs(signatures: U32, bands: int) -> I64:
    """Unique (i, j) index pairs, i < j, that share at least one LSH band. Shape (M, 2)."""
    n = signatures.shape[0]
    rows = signatures.shape[1] // bands
    found = [band_pairs(band_keys(signatures, band, rows)) for band in range(bands)]
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    if not len(pairs):
        return np.zeros((0, 2), dtype=np.int64)
    packed = np.unique(pairs[:, 0] * (n + 1) + pairs[:, 1])
    return np.stack((packed // (n + 1), packed % (n + 1)), axis=1)
