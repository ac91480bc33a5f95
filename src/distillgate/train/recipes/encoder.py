"""Encoder-classifier recipe (``student.family: encoder``): ``kd`` on the teacher's label distributions, or ``sft``
on its hard labels, for a sentence encoder + linear head fine-tuned end to end.

Reads top to bottom: guard the rows (``guarded_rows``, the same frozen-version golden/test/holdout refusal as every
recipe), load the encoder and put a head over the task's labels, encode each row's text with the task template,
start the head at the label prototypes (``init_head``, with ``head_init: prototypes``), and train with the shared
loop (checkpoints, resume, progress, run record). The loss on a batch of logits ``z`` (B, L):

* ``kd``:  ``(1 - hard_weight) * T^2 * KL(p_teacher^T || softmax(z / T)) + hard_weight * CE(z, teacher label)``
  (``label_kd_loss``, the same formula the causal-LM student uses for ``label_probs``);
* ``sft``: ``CE(z, label)`` -- the label stored with the row (the teacher's, or the reviewer's correction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from distillgate.data.guard import is_corrected, training_target
from distillgate.errors import UserError
from distillgate.train.config import TrainConfig
from distillgate.train.encode import Example
from distillgate.train.encoder import EncoderClassifier, load_encoder, pad_ids
from distillgate.train.loop import StepResult, TrainResult, train
from distillgate.train.losses import label_kd_loss
from distillgate.train.setup import guarded_rows


def make_examples(rows: Sequence[dict[str, Any]], tokenizer: Any, labels: Sequence[str], template: str,
                  max_length: int, *, need_probs: bool) -> tuple[list[Example], dict[str, int]]:
    """Rows -> Examples: the template-filled text's token ids, the label index, the label distribution."""
    pos = {name: i for i, name in enumerate(labels)}
    stats = {"truncated": 0, "unknown_label": 0}
    out: list[Example] = []
    lacking: list[str] = []
    for row in rows:
        text = template.replace("{input}", str(row["input"]))
        ids = [int(i) for i in tokenizer(text, truncation=False)["input_ids"]]
        if len(ids) > max_length:
            stats["truncated"] += 1
            ids = ids[: max_length - 1] + ids[-1:]  # keep the closing [SEP]
        # the row's label (its output when it has none); a reviewer's correction is the label taught
        label = training_target(row) if is_corrected(row) else (row.get("label") or row.get("output"))
        index = pos.get(str(label)) if label is not None else None
        if index is None:
            stats["unknown_label"] += 1
        probs = row.get("label_probs")
        if is_corrected(row) and index is not None:  # the reviewer's label, with certainty
            vector: list[float] | None = [1.0 if i == index else 0.0 for i in range(len(labels))]
        else:
            vector = [float(probs.get(name, 0.0)) for name in labels] if isinstance(probs, dict) else None
        if need_probs and (vector is None or sum(vector) <= 0):
            lacking.append(str(row["row_id"]))
        out.append(Example(str(row["row_id"]), ids, [], label_index=index, label_probs=vector))
    if lacking:
        raise UserError(f"{len(lacking)} row(s) have no label_probs over the configured labels, e.g. {lacking[:3]}",
                        hint="kd needs the teacher's label distributions (generation.label_scoring: true); "
                        "or train with recipe sft")
    if not need_probs and stats["unknown_label"] == len(out):
        raise UserError("no row's label is one of the configured labels", hint="check train.labels")
    return out, stats


@torch.no_grad()
def init_head(model: EncoderClassifier, tokenizer: Any, examples: Sequence[Example], pad_id: int, *,
              soft: bool, batch: int = 64) -> list[str]:
    """Start the head at the label prototypes of the training rows (``EncoderClassifier.init_prototypes``): each
    row weighted by the teacher's distribution (``soft``, kd) or its label (sft). A label no row carries starts at
    the embedding of its own name ("card_arrival" -> "card arrival"). Returns those labels."""
    was_training = model.training
    model.train(False)
    pooled = []
    for start in range(0, len(examples), batch):
        ids, mask = pad_ids([e.prompt for e in examples[start:start + batch]], pad_id)
        pooled.append(model.pool(ids, mask))
    n_labels = len(model.labels)
    targets = torch.zeros((len(examples), n_labels))
    for i, e in enumerate(examples):
        if soft and e.label_probs is not None:
            targets[i] = torch.tensor(e.label_probs)
        elif e.label_index is not None:
            targets[i, e.label_index] = 1.0
    names = [lab.replace("_", " ") for lab in model.labels]
    name_ids = [[int(t) for t in tokenizer(n, truncation=True, max_length=model.max_length)["input_ids"]]
                for n in names]
    fallback = torch.cat([model.pool(*pad_ids(name_ids[s:s + batch], pad_id)) for s in range(0, n_labels, batch)])
    started = model.init_prototypes(torch.cat(pooled), targets, fallback)
    model.train(was_training)
    return started


def run(config: TrainConfig) -> TrainResult:
    settings = config.student.encoder
    assert settings is not None and config.labels
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rows, dataset = guarded_rows(config)  # golden / test / holdout rows are refused before any model is loaded
    encoder, tokenizer = load_encoder(settings.path)
    head_lr = settings.head_lr or 20 * config.lr
    model = EncoderClassifier(encoder, config.labels, template=config.prompt.template,
                              max_length=config.max_length, head_lr_scale=head_lr / config.lr,
                              normalise=settings.head_init == "prototypes", serve=settings.serve)
    if settings.freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    if settings.freeze_word_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    kd = config.kd
    examples, stats = make_examples(rows, tokenizer, config.labels, config.prompt.template, config.max_length,
                                    need_probs=config.recipe == "kd")
    pad_id = int(tokenizer.pad_token_id or 0)
    fallback: list[str] = []
    if settings.head_init == "prototypes":
        fallback = init_head(model, tokenizer, examples, pad_id, soft=config.recipe == "kd")
    total = sum(p.numel() for p in model.parameters())
    record: dict[str, Any] = {
        "recipe": config.recipe, "family": "encoder_classifier",
        "config": config.model_dump(mode="json"),
        "dataset": dataset,
        "student": {"parameters": total, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "family": "encoder_classifier", "encoder": settings.path, "labels": len(config.labels),
                    "freeze_encoder": settings.freeze_encoder,
                    "freeze_word_embeddings": settings.freeze_word_embeddings, "head_init": settings.head_init,
                    "labels_started_from_name": len(fallback), "serve": settings.serve},
        "encoding": stats,
    }

    def step(batch: Sequence[Example]) -> StepResult:
        ids, mask = pad_ids([e.prompt for e in batch], pad_id)  # (B, T)
        logits = model(ids, mask)  # (B, L)
        gold = torch.tensor([e.label_index if e.label_index is not None else -100 for e in batch])
        n_tokens = int(mask.sum())
        if config.recipe == "sft":
            ce = F.cross_entropy(logits, gold, ignore_index=-100)
            return StepResult(ce, n_tokens, {"ce": float(ce.detach())})
        teacher = torch.tensor([e.label_probs for e in batch])  # (B, L)
        use_gold = kd.hard_weight > 0 and bool((gold != -100).any())
        parts = label_kd_loss(logits, teacher, None, kind=kd.divergence, temperature=kd.temperature, beta=kd.beta)
        loss = parts.loss if not use_gold else (1 - kd.hard_weight) * parts.loss + kd.hard_weight * \
            F.cross_entropy(logits, gold, ignore_index=-100)
        return StepResult(loss, n_tokens, {"kd": parts.kd})

    return train(config, model, tokenizer, examples, step, record)
