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


def test_the_optimizer_is_fused_adamw_and_steps_as_the_default_one() -> None:
    import torch

    from distillgate.train.loop import adamw

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(t.detach().clone()) for t in a]
    fused = adamw([{"params": a[:1], "lr": 0.02}, {"params": a[1:], "lr": 0.001}], lr=0.001, weight_decay=0.01)
    plain = torch.optim.AdamW([{"params": b[:1], "lr": 0.02}, {"params": b[1:], "lr": 0.001}], lr=0.001,
                              weight_decay=0.01)
    assert fused.defaults["fused"] is True and [g["lr"] for g in fused.param_groups] == [0.02, 0.001]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, torch.zeros_like(p)) for p in a)
