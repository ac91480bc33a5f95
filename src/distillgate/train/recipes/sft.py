"""SFT recipe: next-token cross-entropy on the teacher's normalised answers, loss on answer tokens only.

Reads top to bottom: guard the rows, build the student, encode prompts exactly as the teacher saw them, and train
with the chunked head+loss (no full-vocabulary logits for the whole batch).
"""

from __future__ import annotations

from collections.abc import Sequence

from distillgate.train.config import TrainConfig
from distillgate.train.encode import Example, collate, make_examples
from distillgate.train.loop import StepResult, TrainResult, train
from distillgate.train.losses import chunked_kd_loss
from distillgate.train.setup import prepare
from distillgate.train.student import decoder_and_head


def run(config: TrainConfig) -> TrainResult:
    prep = prepare(config, keep_teacher=False)
    student, tokenizer = prep.student, prep.tokenizer
    examples, enc_stats = make_examples(prep.rows, tokenizer, config.prompt, max_length=config.max_length)
    prep.record["encoding"] = enc_stats
    body, head_weight = decoder_and_head(student)

    def step(batch_examples: Sequence[Example]) -> StepResult:
        batch = collate(batch_examples, tokenizer.pad_token_id)
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (B,T,H)
        answer_hidden = hidden[batch.rows, batch.cols]  # (N, H): positions that predict answer tokens
        parts = chunked_kd_loss(answer_hidden, head_weight, batch.labels, None)
        return StepResult(parts.loss, batch.n_tokens, {"ce": parts.ce})

    return train(config, student, tokenizer, examples, step, prep.record)
