"""Turning rows into token ids the way the teacher saw them, and batches with the answer positions marked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from distillgate.data.guard import is_corrected, training_target
from distillgate.errors import UserError
from distillgate.train.config import PromptSettings, TraceSettings


def render_messages(prompt: PromptSettings, text: str) -> list[dict[str, str]]:
    messages = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": prompt.template.replace("{input}", text)})
    return messages


def prompt_ids(tokenizer: Any, prompt: PromptSettings, text: str) -> list[int]:
    """Token ids of the prompt, ending where the assistant's answer starts.

    With ``chat_template`` (default) and a tokenizer that has one, this is ``apply_chat_template(...,
    add_generation_prompt=True)`` over [system?, user] -- what an OpenAI-style teacher saw. Otherwise the plain text
    ``system + "\\n\\n" + user + "\\n"``.
    """
    messages = render_messages(prompt, text)
    if prompt.chat_template and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if not isinstance(out, list) else out
        return [int(i) for i in ids]
    plain = "\n\n".join(m["content"] for m in messages) + "\n"
    return [int(i) for i in tokenizer(plain, add_special_tokens=True)["input_ids"]]


def answer_ids(tokenizer: Any, output: str) -> list[int]:
    """The answer's token ids followed by the end-of-turn (eos) token: the student learns to stop."""
    ids = [int(i) for i in tokenizer(output, add_special_tokens=False)["input_ids"]]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


@dataclass(frozen=True)
class Example:
    row_id: str
    prompt: list[int]
    answer: list[int]
    top_ids: list[list[int]] | None = None  # per answer token (excl. eos): teacher's top-k ids
    top_logprobs: list[list[float]] | None = None
    label_index: int | None = None
    label_probs: list[float] | None = None
    corrected: bool = False  # a reviewer corrected the answer: distil the correction, not the teacher's belief
    task: Literal["answer", "rationale"] = "answer"  # rationale: the trace, an auxiliary target (traces.use)


def _top_k(tokenizer: Any, entries: Any) -> tuple[list[int], list[float]]:
    """One answer token's stored top-k: token strings that are not exactly one student token go to the remainder."""
    ids, lps = [], []
    for entry in entries:
        token = entry.get("token") if isinstance(entry, dict) else None
        lp = entry.get("logprob") if isinstance(entry, dict) else None
        if not isinstance(token, str) or not isinstance(lp, (int, float)):
            raise UserError(f"top_logprobs entry {entry!r} is not {{token, logprob}}",
                            hint="store OpenAI-style top_logprobs lists with the rows")
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id or tid in ids:
            enc = tokenizer(token, add_special_tokens=False)["input_ids"]
            tid = enc[0] if len(enc) == 1 else None
        if tid is not None and tid not in ids:
            ids.append(int(tid))
            lps.append(float(lp))
    return ids, lps


def _trace(row: dict[str, Any]) -> str | None:
    trace = row.get("trace")
    return trace.strip() if isinstance(trace, str) and trace.strip() else None


def make_examples(rows: Sequence[dict[str, Any]], tokenizer: Any, prompt: PromptSettings, *, max_length: int,
                  labels: Sequence[str] | None = None, want_top_k: bool = False,
                  traces: TraceSettings | None = None) -> tuple[list[Example], dict[str, int]]:
    """Encode rows; returns examples and counters (truncated rows, rows whose top-k could not be aligned, and with
    ``traces``: rows with and without a trace).

    ``traces.use``: ``answer`` (default) teaches the answer alone; ``trace_answer`` teaches ``traces.format`` (the
    trace, then the answer) as one target; ``rationale`` adds, for every row with a trace, a second example whose
    prompt is ``traces.rationale_template`` and whose target is the trace (``task="rationale"``), while the answer
    example keeps the row's usual prompt, so the student is asked at inference exactly as before."""
    label_pos = {name: i for i, name in enumerate(labels or [])}
    use = traces.use if traces is not None else "answer"
    stats = {"truncated": 0, "topk_misaligned": 0}
    if use != "answer":
        stats.update({"with_trace": 0, "without_trace": 0})
    out = []
    for row in rows:
        p = prompt_ids(tokenizer, prompt, str(row["input"]))
        target = training_target(row)  # a reviewer's correction is the answer taught
        if target is None:
            raise UserError(f"row {row['row_id']} has neither 'output' nor 'label'",
                            hint="train on rows with a teacher answer")
        corrected = is_corrected(row)
        trace = _trace(row) if use != "answer" else None
        if use != "answer":
            stats["with_trace" if trace else "without_trace"] += 1
        if traces is not None and use == "rationale" and trace:
            rp = prompt_ids(tokenizer, prompt.model_copy(update={"template": traces.rationale_template}),
                            str(row["input"]))
            ra = answer_ids(tokenizer, trace)
            if len(rp) + len(ra) > max_length:
                stats["truncated"] += 1
                ra = ra[:max(1, max_length - len(rp))] if len(rp) < max_length else ra[:1]
                rp = rp[-max(1, max_length - len(ra)):]
            out.append(Example(f"{row['row_id']}#rationale", rp, ra, task="rationale"))
        if traces is not None and use == "trace_answer" and trace:
            target = traces.format.replace("{trace}", trace).replace("{answer}", str(target))
        a = answer_ids(tokenizer, str(target))
        if len(p) + len(a) > max_length:
            stats["truncated"] += 1
            p = p[-max(1, max_length - len(a)):]
        top_ids = top_lps = None
        if want_top_k and row.get("top_logprobs") and not corrected:  # a corrected answer: the hard target
            pairs = [_top_k(tokenizer, entries) for entries in row["top_logprobs"]]
            if len(pairs) == len(a) - 1:
                top_ids, top_lps = [x[0] for x in pairs], [x[1] for x in pairs]
            else:
                stats["topk_misaligned"] += 1
        label_index = label_probs = None
        if labels:
            label = row.get("label")
            label_index = label_pos.get(str(label)) if label is not None else None
            probs = row.get("label_probs")
            if corrected and label_index is not None:  # the reviewer's label, with certainty
                label_probs = [1.0 if i == label_index else 0.0 for i in range(len(labels))]
            elif isinstance(probs, dict):
                label_probs = [float(probs.get(name, 0.0)) for name in labels]
        out.append(Example(str(row["row_id"]), p, a, top_ids, top_lps, label_index, label_probs, corrected))
    return out, stats


def trace_lengths(rows: Sequence[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """The traces of the rows trained on (``data.trace_stats``), and their length in the student's tokens."""
    from distillgate.data.trace_stats import trace_stats

    stats = trace_stats(rows)
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (_trace(r) for r in rows) if t]
    ordered = sorted(tokens)
    stats["tokens"] = ({"mean": sum(ordered) / len(ordered), "median": float(ordered[len(ordered) // 2]),
                        "max": float(ordered[-1])} if ordered else None)
    return stats


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,) batch index of each answer position
    cols: torch.Tensor  # (N,) position whose output predicts an answer token
    labels: torch.Tensor  # (N,) the answer token ids
    n_tokens: int  # real (unpadded) tokens in the batch


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    lengths = [len(e.prompt) + len(e.answer) for e in examples]
    t = max(lengths)
    input_ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    rows, cols, labels = [], [], []
    for b, e in enumerate(examples):
        seq = e.prompt + e.answer
        input_ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        for j, tok in enumerate(e.answer):
            rows.append(b)
            cols.append(len(e.prompt) + j - 1)
            labels.append(tok)
    return Batch(input_ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels), sum(lengths))


def sparse_targets(examples: Sequence[Example], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids/log-probs (N, k) aligned with ``collate``'s answer positions.

    Positions with no stored top-k (the eos position, rows whose teacher tokens did not align with the student's
    tokenizer) get a one-hot target at the answer token, i.e. the hard label. Short lists are padded with distinct
    unused ids at log-prob -inf (zero mass).
    """
    per_pos: list[tuple[list[int], list[float]]] = []
    for e in examples:
        for j, tok in enumerate(e.answer):
            if e.top_ids is not None and e.top_logprobs is not None and j < len(e.top_ids) and e.top_ids[j]:
                per_pos.append((list(e.top_ids[j]), list(e.top_logprobs[j])))
            else:
                per_pos.append(([tok], [0.0]))
    k = max(len(ids) for ids, _ in per_pos)
    ids_t = torch.empty((len(per_pos), k), dtype=torch.long)
    lps_t = torch.full((len(per_pos), k), float("-inf"))
    for n, (ids, lps) in enumerate(per_pos):
        fill, cand = list(ids), 0
        while len(fill) < k:
            if cand not in ids:
                fill.append(cand)
            cand += 1
        if cand > vocab_size:
            raise UserError("vocabulary too small for the stored top-k", hint="lower k")
        ids_t[n] = torch.tensor(fill)
        lps_t[n, : len(lps)] = torch.tensor(lps)
    return ids_t, lps_t
