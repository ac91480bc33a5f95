"""What both recipes do first: read and guard the rows, build the student (and teacher), start the run record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillgate.canonical import sha256_file
from distillgate.data.guard import ensure_trainable
from distillgate.errors import UserError
from distillgate.train.config import TrainConfig
from distillgate.train.rows import load_rows, provenance
from distillgate.train.student import (
    apply_lora,
    count_parameters,
    layer_subset_student,
    load_causal_lm,
)


@dataclass
class Prepared:
    rows: list[dict[str, Any]]
    student: Any
    tokenizer: Any
    teacher: Any | None
    record: dict[str, Any]


def prepare(config: TrainConfig, *, keep_teacher: bool) -> Prepared:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rows = load_rows(config.rows)
    ensure_trainable(rows)  # golden / test / holdout rows are refused here, before any model is loaded
    if not rows:
        raise UserError(f"{config.rows} has no rows to train on", hint="check filter_status and the split")
    teacher = None
    if config.teacher is not None:
        teacher, teacher_tok = load_causal_lm(config.teacher)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if config.student.from_teacher is not None:
        assert teacher is not None
        student, tokenizer = layer_subset_student(teacher, config.student.from_teacher), teacher_tok
        for p in student.parameters():
            p.requires_grad_(True)
    else:
        assert config.student.model is not None
        student, tokenizer = load_causal_lm(config.student.model)
    if config.student.lora is not None:
        student = apply_lora(student, config.student.lora)
    if teacher is not None and not keep_teacher:
        teacher = None
    total, trainable = count_parameters(student)
    record: dict[str, Any] = {
        "recipe": config.recipe,
        "config": config.model_dump(mode="json"),
        "dataset": {"rows_path": config.rows, "rows_sha256": sha256_file(config.rows),
                    "dataset_version": config.dataset_version, **provenance(rows)},
        "student": {"parameters": total, "trainable": trainable,
                    "layers": getattr(student.config, "num_hidden_layers", None),
                    "layer_subset": getattr(student.config, "distillgate_layer_subset", None)},
        "teacher": config.teacher.model_dump() if config.teacher else None,
    }
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    return Prepared(rows, student, tokenizer, teacher, record)
