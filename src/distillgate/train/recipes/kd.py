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

import torch

from distillgate.errors import UserError
from distillgate.train.config import TrainConfig
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
            scores = label_scores(student, [e.prompt for e in batch_examples], label_tokens, pad_id)  # (B, L)
            teacher_probs = torch.tensor([e.label_probs for e in batch_examples])  # (B, L)
            gold = None
            if kd.hard_weight > 0:
                gold = torch.tensor([e.label_index if e.label_index is not None else -100 for e in batch_examples])
            parts = label_kd_loss(scores, teacher_probs, gold, kind=kd.divergence, temperature=kd.temperature,
                                  beta=kd.beta, hard_weight=kd.hard_weight)
            n_tokens = sum(len(e.prompt) + sum(len(t) for t in label_tokens) for e in batch_examples)
            return StepResult(parts.loss, n_tokens, {"kd": parts.kd, "ce": parts.ce})

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
            target = DenseTeacher(t_hidden[batch.rows, batch.cols], teacher_head)
        else:
            top_ids, top_lps = sparse_targets(batch_examples, head_weight.shape[0])
            target = SparseTeacher(top_ids, top_lps)
        parts = chunked_kd_loss(answer_hidden, head_weight, batch.labels, target, kind=kd.divergence,
                                temperature=kd.temperature, beta=kd.beta, hard_weight=kd.hard_weight,
                                chunk_size=kd.chunk_size)
        return StepResult(parts.loss, batch.n_tokens, {"kd": parts.kd, "ce": parts.ce})

    return train(config, student, tokenizer, examples, token_step, prep.record)
