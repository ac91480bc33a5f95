"""SFT recipe: next-token cross-entropy on the teacher's normalised answers, loss on answer tokens only.

Reads top to bottom: guard the rows, build the student, encode prompts exactly as the teacher saw them, and train
with the chunked head+loss (no full-vocabulary logits for the whole batch).

Reasoning traces (``traces.use``): ``trace_answer`` only changes the target text (encode.make_examples);
``rationale`` is multi-task training as in "distilling step-by-step" (Hsieh et al., 2023): the batch mixes answer
examples and rationale examples, and the loss is ``CE(answer tokens) + rationale_weight * CE(rationale tokens)``,
each a mean over its own tokens, so the auxiliary target never outweighs the answer by sheer length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distillgate.train.config import TrainConfig
from distillgate.train.encode import Example, collate, make_examples, trace_lengths
from distillgate.train.loop import StepResult, TrainResult, train
from distillgate.train.losses import chunked_kd_loss
from distillgate.train.setup import prepare
from distillgate.train.student import decoder_and_head


def run(config: TrainConfig) -> TrainResult:
    prep = prepare(config, keep_teacher=False)
    student, tokenizer = prep.student, prep.tokenizer
    examples, enc_stats = make_examples(prep.rows, tokenizer, config.prompt, max_length=config.max_length,
                                        traces=config.traces)
    prep.record["encoding"] = enc_stats
    prep.record["traces"] = {"use": config.traces.use, **trace_lengths(prep.rows, tokenizer)}
    body, head_weight = decoder_and_head(student)
    weight = config.traces.rationale_weight

    def step(batch_examples: Sequence[Example]) -> StepResult:
        batch = collate(batch_examples, tokenizer.pad_token_id)
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (B,T,H)
        answer_hidden = hidden[batch.rows, batch.cols]  # (N, H): positions that predict answer tokens
        rationale = torch.tensor([batch_examples[b].task == "rationale" for b in batch.rows.tolist()])  # (N,)
        if not bool(rationale.any()):
            parts = chunked_kd_loss(answer_hidden, head_weight, batch.labels, None)
            return StepResult(parts.loss, batch.n_tokens, {"ce": parts.ce})
        aux = chunked_kd_loss(answer_hidden[rationale], head_weight, batch.labels[rationale], None)
        if bool(rationale.all()):
            return StepResult(weight * aux.loss, batch.n_tokens, {"ce_rationale": aux.ce})
        main = chunked_kd_loss(answer_hidden[~rationale], head_weight, batch.labels[~rationale], None)
        return StepResult(main.loss + weight * aux.loss, batch.n_tokens, {"ce": main.ce, "ce_rationale": aux.ce})

    return train(config, student, tokenizer, examples, step, prep.record)
