"""The one MinHash implementation (distillgate.minhash): batch and single-set signatures agree, and estimate Jaccard."""

from __future__ import annotations

import numpy as np

from _data_support import banking_rows
from distillgate import minhash


def _sets(texts: list[str]) -> tuple[list[int], np.ndarray]:
    _, counts, flat = minhash.chunk_shingles(texts, 2)
    return counts, flat


def test_one_set_signature_equals_the_batch_row():
    texts = [r["text"] for r in banking_rows(limit=300)]
    counts, flat = _sets(texts)
    perms = minhash.Permutations.make(64, 42)
    batch = minhash.signatures(flat, counts, perms)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    for i in range(len(texts)):
        np.testing.assert_array_equal(minhash.signature(flat[offsets[i] : offsets[i + 1]], perms), batch[i])


def test_signature_agreement_estimates_jaccard():
    rng = np.random.default_rng(0)
    perms = minhash.Permutations.make(256, 7)
    universe = rng.integers(0, 2**63, size=400, dtype=np.uint64)
    for shared in (50, 150, 300):
        a = universe[:200]
        b = universe[200 - shared // 2 : 400 - shared // 2][: 200]
        true = len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
        estimate = float(np.mean(minhash.signature(a, perms) == minhash.signature(b, perms)))
        assert abs(estimate - true) < 0.1, (shared, true, estimate)


def test_permutations_are_seeded_and_odd():
    one, two = minhash.Permutations.make(64, 42), minhash.Permutations.make(64, 42)
    np.testing.assert_array_equal(one.a, two.a)
    assert (one.a % 2 == 1).all()
    assert not np.array_equal(one.a, minhash.Permutations.make(64, 43).a)


def test_candidate_pairs_find_near_copies_and_skip_strangers():
    base = "please tell me how i can activate the new card that arrived today in the post"
    texts = [base, base + " thanks", "completely different words about exchange rates and fees"]
    counts, flat = _sets(texts)
    sigs = minhash.signatures(flat, counts, minhash.Permutations.make(64, 42))
    pairs = minhash.candidate_pairs(sigs, 16).tolist()
    assert [0, 1] in pairs and all(2 not in p for p in pairs)
