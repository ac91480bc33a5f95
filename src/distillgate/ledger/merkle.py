"""RFC 6962 / 9162 Merkle tree over decision-log entries.

Leaf hash = SHA-256(0x00 || entry_hash bytes); node hash = SHA-256(0x01 || left || right). The tree over n
leaves splits at the largest power of two below n. ``Frontier`` keeps the perfect subtrees of the current size
(O(log n) hashes), so appending and computing the root are cheap and can be persisted with each transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

EMPTY_ROOT = hashlib.sha256(b"").hexdigest()
_sha256 = hashlib.sha256


def leaf_hash(entry_hash_hex: str) -> bytes:
    return hashlib.sha256(b"\x00" + bytes.fromhex(entry_hash_hex)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


@dataclass
class Frontier:
    """Perfect subtrees covering leaves [0, size), largest first: list of (height, hash)."""

    size: int = 0
    nodes: list[tuple[int, bytes]] = field(default_factory=list)

    def append(self, entry_hash_hex: str) -> None:
        self.append_digest(bytes.fromhex(entry_hash_hex))

    def append_digest(self, entry_hash: bytes) -> None:
        """``append`` of an entry hash given as its 32 bytes (not its hex)."""
        height, h = 0, _sha256(b"\x00" + entry_hash).digest()
        nodes = self.nodes
        while nodes and nodes[-1][0] == height:
            h = _sha256(b"\x01" + nodes.pop()[1] + h).digest()
            height += 1
        nodes.append((height, h))
        self.size += 1

    def root(self) -> str:
        if not self.nodes:
            return EMPTY_ROOT
        h = self.nodes[-1][1]
        for _, left in reversed(self.nodes[:-1]):
            h = node_hash(left, h)
        return h.hex()

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "nodes": [[height, h.hex()] for height, h in self.nodes]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Frontier:
        nodes_raw = data.get("nodes") or []
        assert isinstance(nodes_raw, list)
        size = data.get("size", 0)
        assert isinstance(size, int)
        return cls(size=size, nodes=[(int(height), bytes.fromhex(str(h))) for height, h in nodes_raw])


def _split(n: int) -> int:
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


class Tree:
    """A tree over a fixed list of entry hashes, for roots and inclusion proofs (memoised subtree hashes)."""

    def __init__(self, entry_hashes: Sequence[str]) -> None:
        self._leaves = [leaf_hash(h) for h in entry_hashes]
        self._mth = lru_cache(maxsize=None)(self._mth_uncached)

    @property
    def size(self) -> int:
        return len(self._leaves)

    def _mth_uncached(self, start: int, end: int) -> bytes:
        n = end - start
        if n == 1:
            return self._leaves[start]
        k = _split(n)
        return node_hash(self._mth(start, start + k), self._mth(start + k, end))

    def root(self, size: int | None = None) -> str:
        size = self.size if size is None else size
        if size == 0:
            return EMPTY_ROOT
        return self._mth(0, size).hex()

    def inclusion_proof(self, index: int, size: int | None = None) -> list[str]:
        size = self.size if size is None else size
        if not 0 <= index < size <= self.size:
            raise ValueError(f"index {index} not in tree of size {size}")
        path: list[bytes] = []
        start, end, m = 0, size, index
        while end - start > 1:
            k = _split(end - start)
            if m - start < k:
                path.append(self._mth(start + k, end))
                end = start + k
            else:
                path.append(self._mth(start, start + k))
                start = start + k
        return [h.hex() for h in reversed(path)]


def verify_inclusion(entry_hash_hex: str, index: int, size: int, proof: Sequence[str], root_hex: str) -> bool:
    """RFC 9162 section 2.1.3.2 inclusion proof verification."""
    if index >= size:
        return False
    fn, sn = index, size - 1
    r = leaf_hash(entry_hash_hex)
    for p_hex in proof:
        p = bytes.fromhex(p_hex)
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r.hex() == root_hex
