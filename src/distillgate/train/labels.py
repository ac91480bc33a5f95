"""Label scoring: the log-likelihood of every label's answer given the prompt, in one prompt pass per row.

The prompt is run once with a KV cache; the cache is repeated for the L labels and the labels' tokens are run as a
batch of L short continuations. Differentiable (the student is trained through it) and usable under no_grad
(teacher label distributions, predictions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def score_labels(model: Any, prompt: Sequence[int], labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """(L,) sum of log P(label tokens | prompt) for each label's token ids (incl. its eos)."""
    device = next(model.parameters()).device
    x = torch.tensor([list(prompt)], device=device)
    out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,)
    scores = first[torch.tensor([lab[0] for lab in labels], device=device)]  # (L,)
    longest = max(len(lab) for lab in labels)
    if longest == 1:
        return scores
    n = len(labels)
    cont = torch.zeros((n, longest - 1), dtype=torch.long, device=device)
    mask = torch.ones((n, len(prompt) + longest - 1), dtype=torch.long, device=device)
    for i, lab in enumerate(labels):
        cont[i, : len(lab) - 1] = torch.tensor(list(lab[:-1]))
        mask[i, len(prompt) + len(lab) - 1:] = 0
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = model(input_ids=cont, attention_mask=mask, past_key_values=cache, use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)  # (L, longest-1, V)
    extra = []
    for i, lab in enumerate(labels):
        nxt = torch.tensor(list(lab[1:]), device=device)
        extra.append(logp[i, torch.arange(len(lab) - 1, device=device), nxt].sum())
    return scores + torch.stack(extra)


@torch.no_grad()
def label_distribution(model: Any, prompt: Sequence[int], labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """(L,) probabilities over the label set (label scores renormalised)."""
    return torch.softmax(score_labels(model, prompt, labels), dim=-1)
