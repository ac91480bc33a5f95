from __future__ import annotations

import hashlib

import pytest

from distillgate.ledger.merkle import EMPTY_ROOT, Frontier, Tree, leaf_hash, node_hash, verify_inclusion


def reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, written directly from the definition."""
    n = len(leaves)
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


def hashes(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 100])
def test_frontier_and_tree_roots_match_the_definition(n: int) -> None:
    hs = hashes(n)
    expected = reference_root([leaf_hash(h) for h in hs]).hex()
    frontier = Frontier()
    for h in hs:
        frontier.append(h)
    assert frontier.root() == expected
    assert Tree(hs).root() == expected
    assert Frontier.from_json(frontier.to_json()).root() == expected


def test_empty_tree_root() -> None:
    assert Frontier().root() == EMPTY_ROOT == Tree([]).root()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 31])
def test_inclusion_proofs_verify_and_reject_wrong_data(n: int) -> None:
    hs = hashes(n)
    tree = Tree(hs)
    root = tree.root()
    for i in range(n):
        proof = tree.inclusion_proof(i)
        assert verify_inclusion(hs[i], i, n, proof, root)
        assert not verify_inclusion(hashes(n + 1)[-1], i, n, proof, root)
        if n > 1:
            assert not verify_inclusion(hs[i], (i + 1) % n, n, proof, root)


def test_proof_against_an_older_tree_size() -> None:
    hs = hashes(20)
    tree = Tree(hs)
    old_root = tree.root(13)
    assert verify_inclusion(hs[4], 4, 13, tree.inclusion_proof(4, 13), old_root)
