"""Label scoring: the log-likelihood of every label's answer given the prompt.

The prompts run once with a KV cache; the cache is repeated for the L labels and the labels' tokens are run as a
batch of short continuations (``label_scores``). Differentiable (the student is trained through it) and usable
under no_grad (teacher label distributions, predictions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def score_labels(model: Any, prompt: Sequence[int], labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """(L,) sum of log P(label tokens | prompt) for each label's token ids (incl. its eos)."""
    return label_scores(model, [prompt], labels)[0]


@torch.no_grad()
def label_distribution(model: Any, prompt: Sequence[int], labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """(L,) probabilities over the label set (label scores renormalised)."""
    return torch.softmax(score_labels(model, prompt, labels), dim=-1)


@torch.no_grad()
def score_labels_batch(model: Any, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                       pad_id: int = 0) -> torch.Tensor:
    """(B, L) label log-likelihoods for several prompts at once, without gradients (teacher targets, predictions)."""
    return label_scores(model, prompts, labels, pad_id)


def label_scores(model: Any, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                 pad_id: int = 0) -> torch.Tensor:
    """(B, L) label log-likelihoods for several prompts in two batched passes; differentiable (the kd recipe).

    The prompts run as one left-padded batch with a KV cache; the cache is repeated for the L labels and every
    (prompt, label) continuation runs as one batch of ``B * L`` short sequences.
    """
    device = next(model.parameters()).device
    b, n = len(prompts), len(labels)
    width = max(len(p) for p in prompts)
    x = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    pmask = torch.zeros((b, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, width - len(p):] = torch.tensor(list(p))
        pmask[i, width - len(p):] = 1
    pos = (pmask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=x, attention_mask=pmask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    scores = first[:, torch.tensor([lab[0] for lab in labels], device=device)]  # (B, L)
    longest = max(len(lab) for lab in labels)
    if longest == 1:
        return scores
    cont = torch.zeros((n, longest - 1), dtype=torch.long, device=device)
    lmask = torch.zeros((n, longest - 1), dtype=torch.long, device=device)
    nxt = torch.zeros((n, longest - 1), dtype=torch.long, device=device)
    for j, lab in enumerate(labels):
        cont[j, : len(lab) - 1] = torch.tensor(list(lab[:-1]))
        lmask[j, : len(lab) - 1] = 1
        nxt[j, : len(lab) - 1] = torch.tensor(list(lab[1:]))
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)  # row i's cache repeated for labels 0..n-1
    ids = cont.repeat(b, 1)  # (B*L, longest-1)
    mask = torch.cat([pmask.repeat_interleave(n, 0), lmask.repeat(b, 1)], dim=1)
    lengths = pmask.sum(-1).repeat_interleave(n)  # (B*L,)
    cpos = lengths[:, None] + torch.arange(longest - 1, device=device)[None, :]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=cpos, past_key_values=cache,
                   use_cache=False).logits.float()  # (B*L, longest-1, V)
    picked = logits.gather(-1, nxt.repeat(b, 1).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    rest = (picked * lmask.repeat(b, 1)).sum(-1).view(b, n)  # padding steps of short labels count 0
    result: torch.Tensor = scores + rest
    return result
