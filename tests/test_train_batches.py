"""The training loop's batch order: seeded and resumable, and with group_by_length rows of similar length together
while the order stays shuffled."""

from __future__ import annotations

import random

from distillgate.train.loop import batches_for_epoch


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_grouped_batches_cover_every_row_once_with_far_less_padding_and_stay_seeded() -> None:
    rng = random.Random(3)
    lengths = [rng.choice([5, 8, 12, 20, 40, 64]) + rng.randrange(4) for _ in range(1000)]
    plain = batches_for_epoch(1000, 16, seed=0, epoch=2)
    grouped = batches_for_epoch(1000, 16, seed=0, epoch=2, lengths=lengths)
    for batches in (plain, grouped):
        assert sorted(i for b in batches for i in b) == list(range(1000))
    assert padding(grouped, lengths) < padding(plain, lengths) / 3
    assert grouped == batches_for_epoch(1000, 16, seed=0, epoch=2, lengths=lengths)  # a resumed run: same batches
    assert grouped != batches_for_epoch(1000, 16, seed=0, epoch=3, lengths=lengths)  # each epoch reshuffles
    firsts = [lengths[b[0]] for b in grouped[:20]]
    assert firsts != sorted(firsts)  # the batches themselves are not in length order
