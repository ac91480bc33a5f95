"""KD losses against direct reference formulas on random tensors (fixed seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from distillgate.errors import UserError
from distillgate.train.losses import (
    DenseTeacher,
    SparseTeacher,
    chunked_kd_loss,
    divergence,
    label_kd_loss,
    reference_token_loss,
    sparse_teacher_buckets,
)

N, H, V = 13, 8, 50


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    t_hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, t_hidden, t_weight, labels


def test_divergences_match_textbook_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    logq = torch.log_softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    p, q = logp.exp(), logq.exp()
    fkl = (p * (p / q).log()).sum(-1)
    rkl = (q * (q / p).log()).sum(-1)
    beta = 0.3
    m = beta * p + (1 - beta) * q
    jsd = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(divergence(logq, logp, "fkl"), fkl)
    torch.testing.assert_close(divergence(logq, logp, "rkl"), rkl)
    torch.testing.assert_close(divergence(logq, logp, "jsd", beta), jsd)
    assert torch.all(fkl > 0) and torch.all(jsd <= math.log(2) + 1e-9)
    torch.testing.assert_close(divergence(logq, logq, "jsd"), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.0), (2.0, 0.3), (0.7, 1.0)])
def test_chunked_dense_matches_reference_value_and_gradients(kind: str, temperature: float,
                                                            hard_weight: float) -> None:
    hidden, weight, t_hidden, t_weight, labels = _inputs(1)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_token_loss(h1 @ w1.t(), labels, t_hidden @ t_weight.t(), kind=kind,  # type: ignore[arg-type]
                               temperature=temperature, beta=0.4, hard_weight=hard_weight)
    ref.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = chunked_kd_loss(h2, w2, labels, DenseTeacher(t_hidden, t_weight), kind=kind,  # type: ignore[arg-type]
                          temperature=temperature, beta=0.4, hard_weight=hard_weight, chunk_size=4)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.double(), rtol=1e-5, atol=1e-6)
    assert h1.grad is not None and h2.grad is not None and w1.grad is not None and w2.grad is not None
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


def test_chunked_bf16_inputs_keep_an_fp32_loss_and_close_gradients() -> None:
    """bf16 hidden/weights (the GPU case): the loss is computed in fp32 from the bf16 logits, so it matches an fp32
    reference on the same bf16 values closely; the gradient products run in bf16 and stay within bf16 rounding."""
    hidden, weight, t_hidden, t_weight, labels = _inputs(2)
    hb, wb = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    tb, twb = t_hidden.to(torch.bfloat16), t_weight.to(torch.bfloat16)
    h1, w1 = hb.double().requires_grad_(), wb.double().requires_grad_()
    ref = reference_token_loss(h1 @ w1.t(), labels, tb.double() @ twb.double().t(), kind="jsd", beta=0.5,
                               temperature=2.0, hard_weight=0.3)
    ref.backward()
    h2, w2 = hb.clone().requires_grad_(), wb.clone().requires_grad_()
    out = chunked_kd_loss(h2, w2, labels, DenseTeacher(tb, twb), kind="jsd", beta=0.5, temperature=2.0,
                          hard_weight=0.3, chunk_size=4)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and h2.grad is not None and h2.grad.dtype == torch.bfloat16
    assert w2.grad is not None and w2.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.double(), ref.double(), rtol=2e-2, atol=1e-3)
    assert h1.grad is not None and w1.grad is not None
    torch.testing.assert_close(h2.grad.double(), h1.grad, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(w2.grad.double(), w1.grad, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_chunked_sparse_topk_with_remainder_bucket(kind: str, temperature: float) -> None:
    hidden, weight, t_hidden, t_weight, labels = _inputs(2)
    k = 5
    teacher_logp = torch.log_softmax(t_hidden @ t_weight.t(), -1)
    top_lp, top_ids = teacher_logp.topk(k, dim=-1)
    # hand-written bucket reference: k top tokens + one remainder bucket holding the missing mass
    p_top = top_lp.exp()
    p_rest = 1 - p_top.sum(-1, keepdim=True)
    torch.testing.assert_close(sparse_teacher_buckets(top_lp).exp(), torch.cat([p_top, p_rest], -1))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h1 @ w1.t()
    q = torch.softmax(logits / temperature, -1)
    q_top = q.gather(-1, top_ids)
    qb = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    pb = torch.cat([p_top, p_rest], -1) ** (1 / temperature)
    pb = pb / pb.sum(-1, keepdim=True)
    if kind == "fkl":
        kd = (pb * (pb / qb).log()).sum(-1)
    elif kind == "rkl":
        kd = (qb * (qb / pb).log()).sum(-1)
    else:
        m = 0.5 * pb + 0.5 * qb
        kd = 0.5 * (pb * (pb / m).log()).sum(-1) + 0.5 * (qb * (qb / m).log()).sum(-1)
    ref = temperature**2 * kd.mean()
    ref.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = chunked_kd_loss(h2, w2, labels, SparseTeacher(top_ids, top_lp), kind=kind,  # type: ignore[arg-type]
                          temperature=temperature, beta=0.5, chunk_size=3)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.double(), rtol=1e-5, atol=1e-6)
    assert h1.grad is not None and h2.grad is not None and w1.grad is not None and w2.grad is not None
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


def test_sparse_teacher_with_no_missing_mass_equals_dense_over_support() -> None:
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    b = sparse_teacher_buckets(lp).exp()
    torch.testing.assert_close(b, torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64))


def test_chunked_ce_only_matches_cross_entropy_and_is_chunk_invariant() -> None:
    hidden, weight, _, _, labels = _inputs(3)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels)
    for chunk in (1, 5, 100):
        out = chunked_kd_loss(hidden.clone().requires_grad_(), weight, labels, None, chunk_size=chunk)
        torch.testing.assert_close(out.loss.double(), ref)


def test_label_kd_matches_formula_and_hard_mix() -> None:
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(torch.randn(3, 6, generator=g, dtype=torch.float64), -1) * 2  # unnormalised on purpose
    gold = torch.tensor([0, 5, 2])
    out = label_kd_loss(scores, probs, gold, kind="fkl", temperature=2.0, hard_weight=0.25)
    p = torch.softmax(torch.log(probs / 2) / 2, -1)
    q = torch.softmax(scores / 2, -1)
    kd = (p * (p / q).log()).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(scores, gold)
    torch.testing.assert_close(out.loss.double(), 0.75 * 4 * kd + 0.25 * ce)


def test_bad_parameters_are_refused_with_a_fix() -> None:
    hidden, weight, t_hidden, t_weight, labels = _inputs(5)
    with pytest.raises(UserError, match="beta"):
        chunked_kd_loss(hidden, weight, labels, DenseTeacher(t_hidden, t_weight), kind="jsd", beta=1.0)
    with pytest.raises(UserError, match="divergence"):
        chunked_kd_loss(hidden, weight, labels, None, kind="kl")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="vocabulary"):
        chunked_kd_loss(hidden, weight, labels, DenseTeacher(t_hidden, t_weight[:10]))
