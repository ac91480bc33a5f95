"""KD recipe: distil the teacher's probabilities into the student, mixed with the hard-label loss.

Three targets (``kd.target``):

* ``logits``       a local teacher with the same tokenizer runs on the same tokens; full teacher distributions are
                   computed chunk by chunk inside the fused loss (never the whole batch's vocabulary at once);
* ``top_logprobs`` the top-k log-probabilities stored with each row (API teachers), with the missing mass in an
                   explicit remainder bucket;
* ``label_probs``  for label tasks: the teacher's distribution over the label set (from label scoring), matched by
                   the student's own label scores (sequence log-likelihood of each label's answer).

``kd.divergence`` is fkl / rkl / jsd (``kd.beta``) at ``kd.temperature``; ``kd.hard_weight`` mixes in the hard loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from distillgate.errors import UserError
from distillgate.train.config import KDSettings, TrainConfig
from distillgate.train.encode import Example, answer_ids, collate, make_examples, sparse_targets
from distillgate.train.labels import label_scores
from distillgate.train.loop import StepResult, TrainResult, train
from distillgate.train.losses import DenseTeacher, SparseTeacher, chunked_kd_loss, label_kd_loss
from distillgate.train.setup import prepare
from distillgate.train.student import decoder_and_head


def run(config: TrainConfig) -> TrainResult:
    kd = config.kd
    prep = prepare(config, keep_teacher=kd.target == "logits")
    student, tokenizer, teacher = prep.student, prep.tokenizer, prep.teacher
    examples, enc_stats = make_examples(prep.rows, tokenizer, config.prompt, max_length=config.max_length,
                                        labels=config.labels, want_top_k=kd.target == "top_logprobs")
    prep.record["encoding"] = enc_stats
    body, head_weight = decoder_and_head(student)

    if kd.target == "label_probs":
        assert config.labels is not None
        label_tokens = [answer_ids(tokenizer, name) for name in config.labels]  # each label's answer incl. eos
        lacking = [e.row_id for e in examples if e.label_probs is None or sum(e.label_probs) <= 0]
        if lacking:
            raise UserError(f"{len(lacking)} row(s) have no label_probs over the configured labels, e.g. "
                            f"{lacking[:3]}", hint="score the rows with the teacher first, or use kd.target=logits")

        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

        def step(batch_examples: Sequence[Example]) -> StepResult:
            return label_kd_step(student, batch_examples, label_tokens, pad_id, kd)

        return train(config, student, tokenizer, examples, step, prep.record)

    if kd.target == "logits":
        assert teacher is not None
        teacher_body, teacher_head = decoder_and_head(teacher)

    def token_step(batch_examples: Sequence[Example]) -> StepResult:
        batch = collate(batch_examples, tokenizer.pad_token_id)
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (B,T,H)
        answer_hidden = hidden[batch.rows, batch.cols]  # (N, H)
        target: DenseTeacher | SparseTeacher
        if kd.target == "logits":
            with torch.no_grad():
                t_hidden = teacher_body(input_ids=batch.input_ids,
                                        attention_mask=batch.attention_mask).last_hidden_state  # (B,T,Ht)
            fixed = torch.tensor([e.corrected for e in batch_examples])[batch.rows]  # (N,) reviewer-corrected
            if bool(fixed.any()):
                return mixed_step(answer_hidden, batch, fixed, t_hidden)
            target = DenseTeacher(t_hidden[batch.rows, batch.cols], teacher_head)
        else:
            top_ids, top_lps = sparse_targets(batch_examples, head_weight.shape[0])
            target = SparseTeacher(top_ids, top_lps)
        parts = chunked_kd_loss(answer_hidden, head_weight, batch.labels, target, kind=kd.divergence,
                                temperature=kd.temperature, beta=kd.beta, hard_weight=kd.hard_weight,
                                chunk_size=kd.chunk_size)
        return StepResult(parts.loss, batch.n_tokens, {"kd": parts.kd, "ce": parts.ce})

    def mixed_step(answer_hidden: torch.Tensor, batch: Any, fixed: torch.Tensor, t_hidden: torch.Tensor
                   ) -> StepResult:
        """Positions of corrected rows learn the reviewer's answer (a one-hot target: the teacher believed its own
        wrong answer); the others the teacher's distribution. Weighted by positions, as one loss over the batch."""
        n = fixed.numel()
        loss, kd_part, ce_part = torch.zeros(()), 0.0, 0.0
        for mask, dense in ((~fixed, True), (fixed, False)):
            if not bool(mask.any()):
                continue
            labels = batch.labels[mask]
            target: DenseTeacher | SparseTeacher = (
                DenseTeacher(t_hidden[batch.rows[mask], batch.cols[mask]], teacher_head) if dense
                else SparseTeacher(labels.unsqueeze(1), torch.zeros((labels.numel(), 1))))  # (M, 1) one-hot
            parts = chunked_kd_loss(answer_hidden[mask], head_weight, labels, target, kind=kd.divergence,
                                    temperature=kd.temperature, beta=kd.beta, hard_weight=kd.hard_weight,
                                    chunk_size=kd.chunk_size)
            share = float(mask.sum()) / n
            loss = loss + parts.loss * share
            kd_part += parts.kd * share
            ce_part += parts.ce * share
        return StepResult(loss, batch.n_tokens, {"kd": kd_part, "ce": ce_part})

    return train(config, student, tokenizer, examples, token_step, prep.record)


#: (prompt, label) continuations scored with gradients in one pass; a batch with more rows x labels than this is
#: split into row chunks, each backpropagated on its own, so memory stays bounded for large label sets
MAX_LABEL_CONTINUATIONS = 128


def label_kd_step(student: Any, batch: Sequence[Example], label_tokens: Sequence[Sequence[int]], pad_id: int,
                  kd: KDSettings, max_continuations: int = MAX_LABEL_CONTINUATIONS) -> StepResult:
    """One ``label_probs`` KD step. Small batches return a differentiable loss; larger ones (rows x labels above
    ``max_continuations``) run the backward pass chunk by chunk, weighted so the gradients equal the whole batch's."""
    teacher_probs = torch.tensor([e.label_probs for e in batch])  # (B, L)
    gold = torch.tensor([e.label_index if e.label_index is not None else -100 for e in batch])
    n_tokens = sum(len(e.prompt) + sum(len(t) for t in label_tokens) for e in batch)
    rows = max(1, max_continuations // len(label_tokens))
    if len(batch) <= rows:
        scores = label_scores(student, [e.prompt for e in batch], label_tokens, pad_id)  # (B, L)
        parts = label_kd_loss(scores, teacher_probs, gold if kd.hard_weight > 0 else None, kind=kd.divergence,
                              temperature=kd.temperature, beta=kd.beta, hard_weight=kd.hard_weight)
        return StepResult(parts.loss, n_tokens, {"kd": parts.kd, "ce": parts.ce})
    labelled = int((gold != -100).sum())
    total = kd_sum = ce_sum = 0.0
    for start in range(0, len(batch), rows):
        part = slice(start, start + rows)
        scores = label_scores(student, [e.prompt for e in batch[part]], label_tokens, pad_id)
        soft = label_kd_loss(scores, teacher_probs[part], None, kind=kd.divergence, temperature=kd.temperature,
                             beta=kd.beta)  # (temperature^2 x) the chunk's mean divergence
        loss = (1 - kd.hard_weight) * soft.loss * (scores.shape[0] / len(batch))
        kd_sum += soft.kd * scores.shape[0] / len(batch)
        if kd.hard_weight > 0 and labelled:
            ce = F.cross_entropy(scores.float(), gold[part], ignore_index=-100, reduction="sum") / labelled
            loss = loss + kd.hard_weight * ce
            ce_sum += float(ce.detach())
        loss.backward()  # type: ignore[no-untyped-call]
        total += float(loss.detach())
    return StepResult(torch.tensor(total), n_tokens, {"kd": kd_sum, "ce": ce_sum}, backward_done=True)

