"""Distillation losses: reference formulas on small tensors and a chunked, fused head+loss for token-level KD.

Notation (per position): ``p`` the teacher distribution, ``q`` the student distribution, both at temperature ``T``
(``softmax(z / T)``). Divergences, summed over the vocabulary (or over label/bucket sets):

* ``fkl``  forward KL   KL(p || q) = sum p (log p - log q)     (mode covering; the classic Hinton KD loss)
* ``rkl``  reverse KL   KL(q || p) = sum q (log q - log p)     (mode seeking)
* ``jsd``  generalised JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q

The KD term is multiplied by ``T**2`` (Hinton et al.) so its gradient scale does not shrink with temperature, and
mixed with the hard-label cross-entropy: ``loss = (1 - hard_weight) * T**2 * KD + hard_weight * CE``.

Sparse teachers (API top-k log-probabilities) keep the missing mass explicitly: the teacher's top-k tokens are k
buckets and everything else is one *remainder bucket* with mass ``1 - sum(exp(top_logprobs))``; the student's
distribution is collapsed onto the same k + 1 buckets (its remainder is the logsumexp of every other token), and the
divergence is taken between the two (k + 1)-bucket distributions. With ``T != 1`` the teacher buckets are tempered
as atoms (``p_b**(1/T)`` renormalised): the remainder's inner shape is unknown, so this is an approximation.

``chunked_kd_loss`` never materialises full-vocabulary logits for the whole batch: it walks the answer positions in
chunks, computes the chunk's student (and teacher) logits from hidden states and head weights, the loss and its
analytic gradient with respect to the logits, folds that gradient straight into the gradients of the hidden states
and the head weight, and drops the chunk's logits. Peak extra memory is ``O(chunk_size * vocab)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from distillgate.errors import UserError

Divergence = Literal["fkl", "rkl", "jsd"]
DIVERGENCES: tuple[Divergence, ...] = ("fkl", "rkl", "jsd")
RKL_TEACHER_FLOOR = 1e-8  # teacher bucket mass floor for reverse KL (an empty remainder would make it infinite)


def _check(kind: str, temperature: float, beta: float, hard_weight: float) -> None:
    if kind not in DIVERGENCES:
        raise UserError(f"unknown KD divergence {kind!r}", hint=f"use one of {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        raise UserError(f"KD temperature must be > 0, got {temperature}", hint="use e.g. temperature: 1.0 or 2.0")
    if not 0 < beta < 1:
        raise UserError(f"JSD beta must lie strictly between 0 and 1, got {beta}",
                        hint="use beta: 0.5 (symmetric JSD); fkl/rkl are the limits")
    if not 0 <= hard_weight <= 1:
        raise UserError(f"hard_weight must lie in [0, 1], got {hard_weight}", hint="0 = pure KD, 1 = pure SFT")


def _plogratio(p: torch.Tensor, logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log r) over the last dim, with 0 log 0 = 0."""
    terms = torch.where(p > 0, p * (logp - logr), torch.zeros_like(p))
    return terms.sum(-1)


def divergence(student_logq: torch.Tensor, teacher_logp: torch.Tensor, kind: Divergence,
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between two log-distributions (..., K) -> (...). Differentiable by autograd.

    This is the direct reference formula; small tensors only (label sets, tests).
    """
    q, p = student_logq.exp(), teacher_logp.exp()
    if kind == "fkl":
        return _plogratio(p, teacher_logp, student_logq)
    if kind == "rkl":
        floored = torch.clamp(teacher_logp, min=math.log(RKL_TEACHER_FLOOR))
        return _plogratio(q, student_logq, floored)
    logm = torch.logaddexp(teacher_logp + math.log(beta), student_logq + math.log(1 - beta))
    return beta * _plogratio(p, teacher_logp, logm) + (1 - beta) * _plogratio(q, student_logq, logm)


def sparse_teacher_buckets(top_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Teacher top-k log-probs (N, k) -> log-probs over k + 1 buckets (N, k + 1); the last is the remainder."""
    top = top_logprobs.to(torch.promote_types(top_logprobs.dtype, torch.float32))
    rest = torch.clamp(1.0 - top.exp().sum(-1, keepdim=True), min=0.0)  # (N, 1) missing mass
    logb = torch.cat([top, torch.log(rest)], dim=-1)  # log 0 = -inf for an empty remainder
    if temperature != 1.0:
        logb = logb / temperature
    return torch.log_softmax(logb, dim=-1)


def student_buckets(student_logq: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """Student log-probs over the vocabulary (N, V) collapsed onto the teacher's k + 1 buckets (N, k + 1)."""
    top = student_logq.gather(-1, top_ids)  # (N, k)
    rest = student_logq.scatter(-1, top_ids, float("-inf")).logsumexp(-1, keepdim=True)  # (N, 1)
    return torch.cat([top, rest], dim=-1)


@dataclass(frozen=True)
class DenseTeacher:
    """Full teacher logits computed chunk by chunk from the teacher's hidden states and head (same tokenizer)."""

    hidden: torch.Tensor  # (N, Ht)
    head_weight: torch.Tensor  # (V, Ht)

    def logits(self, lo: int, hi: int) -> torch.Tensor:
        z = self.hidden[lo:hi] @ self.head_weight.t()  # (c, V)
        return z.to(torch.promote_types(z.dtype, torch.float32))


@dataclass(frozen=True)
class SparseTeacher:
    """Stored top-k teacher log-probabilities per answer token (API teachers)."""

    top_ids: torch.Tensor  # (N, k) long
    top_logprobs: torch.Tensor  # (N, k)


@dataclass(frozen=True)
class LossParts:
    """The mixed loss (differentiable) and its detached parts, all means over the given positions."""

    loss: torch.Tensor
    kd: float
    ce: float


def _chunk_kd_and_grad(s: torch.Tensor, teacher: DenseTeacher | SparseTeacher | None, lo: int, hi: int,
                       kind: Divergence, temperature: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KD per row (c,) and d KD / d s (c, V) for student tempered logits ``s`` (c, V)."""
    logq = torch.log_softmax(s, dim=-1)
    q = logq.exp()
    if isinstance(teacher, DenseTeacher):
        logp = torch.log_softmax(teacher.logits(lo, hi) / temperature, dim=-1)
        p = logp.exp()
        if kind == "fkl":
            return _plogratio(p, logp, logq), q - p
        if kind == "rkl":
            g = logq - torch.clamp(logp, min=math.log(RKL_TEACHER_FLOOR))
            kd = (q * g).sum(-1)
            return kd, q * (g - kd[:, None])
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
        kd = beta * _plogratio(p, logp, logm) + (1 - beta) * _plogratio(q, logq, logm)
        g = (1 - beta) * (logq - logm)
        return kd, q * (g - (q * g).sum(-1, keepdim=True))
    assert isinstance(teacher, SparseTeacher)
    ids = teacher.top_ids[lo:hi]
    logpb = sparse_teacher_buckets(teacher.top_logprobs[lo:hi], temperature)  # (c, k+1)
    logqb = student_buckets(logq, ids)  # (c, k+1)
    pb, qb = logpb.exp(), logqb.exp()
    kd = divergence(logqb, logpb, kind, beta)
    if kind == "fkl":
        # d/ds_i = q_i - p_b * q_i / qb_b  (for a top-k token q_i = qb_b, so the term is just p_b)
        pull = pb[:, -1:] * torch.exp(logq - logqb[:, -1:])
        pull = pull.scatter(-1, ids, pb[:, :-1])
        return kd, q - pull
    if kind == "rkl":
        gb = logqb - torch.clamp(logpb, min=math.log(RKL_TEACHER_FLOOR))
    else:
        logmb = torch.logaddexp(logpb + math.log(beta), logqb + math.log(1 - beta))
        gb = (1 - beta) * (logqb - logmb)
    dense_g = gb[:, -1:].expand_as(q).scatter(-1, ids, gb[:, :-1])  # (c, V) bucket gradient per token
    return kd, q * (dense_g - (qb * gb).sum(-1, keepdim=True))


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                teacher: DenseTeacher | SparseTeacher | None, kind: Divergence, temperature: float,
                beta: float, hard_weight: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        cdt = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 inputs: losses in fp32
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=cdt) if weight.requires_grad else None
        kd_sum = hidden.new_zeros((), dtype=cdt)
        ce_sum = hidden.new_zeros((), dtype=cdt)
        kd_scale = (1.0 - hard_weight) * temperature**2
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            h = hidden[lo:hi]  # (c, H)
            z = (h @ weight.t()).to(cdt)  # (c, V) -- the only full-vocab tensor, one chunk at a time
            grad_z = torch.zeros_like(z)
            if teacher is not None and kd_scale > 0:
                kd, grad_s = _chunk_kd_and_grad(z / temperature, teacher, lo, hi, kind, temperature, beta)
                kd_sum += kd.sum()
                grad_z += grad_s * (kd_scale / temperature)
            if hard_weight > 0 or teacher is None:
                lab = labels[lo:hi]
                logq1 = torch.log_softmax(z, dim=-1)
                ce_sum -= logq1.gather(-1, lab[:, None]).sum()
                g = logq1.exp()
                g[torch.arange(hi - lo), lab] -= 1.0
                grad_z += g * (hard_weight if teacher is not None else 1.0)
            grad_z /= n
            # The two gradient products run in the inputs' dtype (bf16 on GPU: tensor cores, fp32 accumulation);
            # only the softmax/divergence arithmetic above needs fp32. For fp32 inputs this is unchanged.
            gz = grad_z.to(weight.dtype)
            grad_h[lo:hi] = (gz @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (gz.t() @ h.to(weight.dtype)).to(cdt)
        kd_mean, ce_mean = kd_sum / n, ce_sum / n
        loss = ce_mean.clone() if teacher is None else kd_scale * kd_mean + hard_weight * ce_mean
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_grad_w = grad_w is not None
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return loss, kd_mean, ce_mean

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype)
        gw = (grad_w * grad_loss).to(grad_h.dtype) if ctx.has_grad_w else None
        return gh, gw, None, None, None, None, None, None, None


def chunked_kd_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                    teacher: DenseTeacher | SparseTeacher | None, *, kind: Divergence = "fkl",
                    temperature: float = 1.0, beta: float = 0.5, hard_weight: float = 0.0,
                    chunk_size: int = 256) -> LossParts:
    """Fused student head + KD/CE loss over answer positions.

    ``hidden`` (N, H) are the student's final hidden states at the positions that predict answer tokens,
    ``head_weight`` (V, H) its output embedding, ``labels`` (N,) the answer token ids (hard labels). With
    ``teacher=None`` this is plain cross-entropy (the SFT loss). Returns means over the N positions.
    """
    _check(kind, temperature, beta, hard_weight)
    if hidden.ndim != 2 or labels.shape != hidden.shape[:1]:
        raise UserError(f"chunked_kd_loss wants hidden (N, H) and labels (N,), got {tuple(hidden.shape)} and "
                        f"{tuple(labels.shape)}", hint="select the answer positions before calling it")
    if hidden.shape[0] == 0:
        raise UserError("no answer tokens to train on", hint="check that rows have a non-empty 'output'")
    if isinstance(teacher, DenseTeacher) and teacher.head_weight.shape[0] != head_weight.shape[0]:
        raise UserError(f"teacher vocabulary ({teacher.head_weight.shape[0]}) differs from the student's "
                        f"({head_weight.shape[0]})", hint="full-logit KD needs teacher and student to share a "
                        "tokenizer; use stored top_logprobs or label_probs instead")
    loss, kd, ce = _FusedHeadLoss.apply(  # type: ignore[no-untyped-call]
        hidden, head_weight, labels, teacher, kind, float(temperature), float(beta), float(hard_weight),
        int(chunk_size))
    return LossParts(loss=loss, kd=float(kd), ce=float(ce))


def reference_token_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                         teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None, *,
                         kind: Divergence = "fkl", temperature: float = 1.0, beta: float = 0.5,
                         hard_weight: float = 0.0) -> torch.Tensor:
    """The same loss as ``chunked_kd_loss`` written directly on full logits (N, V); for tests and small inputs.

    ``teacher`` is full teacher logits (N, V), a ``(top_ids, top_logprobs)`` pair, or None (cross-entropy only).
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    if teacher is None:
        return ce
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, tuple):
        ids, lps = teacher
        kd = divergence(student_buckets(logq, ids), sparse_teacher_buckets(lps, temperature), kind, beta)
    else:
        kd = divergence(logq, torch.log_softmax(teacher.float() / temperature, dim=-1), kind, beta)
    return (1 - hard_weight) * temperature**2 * kd.mean() + hard_weight * ce


def label_kd_loss(student_label_logprobs: torch.Tensor, teacher_label_probs: torch.Tensor,
                  gold: torch.Tensor | None = None, *, kind: Divergence = "fkl", temperature: float = 1.0,
                  beta: float = 0.5, hard_weight: float = 0.0) -> LossParts:
    """KD over a label set: student label scores (B, L) (sequence log-likelihoods) vs teacher label probs (B, L).

    Both are renormalised over the label set and tempered; ``gold`` (B,) label indices add the hard-label term.
    """
    _check(kind, temperature, beta, hard_weight)
    logq = torch.log_softmax(student_label_logprobs.float() / temperature, dim=-1)
    probs = teacher_label_probs.float().clamp(min=0)
    logp = torch.log_softmax(torch.log(probs / probs.sum(-1, keepdim=True)) / temperature, dim=-1)
    kd = divergence(logq, logp, kind, beta).mean()
    ce = torch.zeros((), dtype=torch.float32)
    if gold is not None:
        ce = F.cross_entropy(student_label_logprobs.float(), gold)
    loss = (1 - hard_weight) * temperature**2 * kd + hard_weight * ce
    return LossParts(loss=loss, kd=float(kd.detach()), ce=float(ce.detach()))
