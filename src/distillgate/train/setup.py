"""What both recipes do first: read and guard the rows, build the student (and teacher), start the run record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillgate.canonical import sha256_file
from distillgate.data.guard import training_input
from distillgate.data.versions import MANIFEST, ROWS_FILE
from distillgate.errors import DatasetGuardError, UserError
from distillgate.train.config import TrainConfig
from distillgate.train.rows import provenance
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


def dataset_of(config: TrainConfig) -> str:
    """The frozen version a config trains on: ``dataset``, or the version whose ``rows.parquet`` ``rows`` names."""
    if config.dataset is not None:
        return config.dataset
    assert config.rows is not None
    folder = Path(config.rows).parent
    if Path(config.rows).name == ROWS_FILE and (folder / MANIFEST).is_file():
        return str(folder)
    raise DatasetGuardError(
        f"rows file {config.rows!r} is not part of a frozen dataset version",
        hint="train on a frozen version: set 'dataset' to its directory (or a working copy / version id); "
        "'rows' may then list some of its rows")


def guarded_rows(config: TrainConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows every student family trains on, through the one guard (a frozen version; golden, test and holdout
    rows refused), and the run record's ``dataset`` block. Call it before any model is loaded."""
    given = training_input(dataset_of(config), rows_file=config.rows, splits=config.splits)
    rows = given.rows
    if config.dataset_version and not given.version_id.startswith(config.dataset_version):
        raise DatasetGuardError(f"dataset_version {config.dataset_version!r} is not the version trained on "
                                f"({given.version_id[:16]})", hint="drop dataset_version or fix 'dataset'")
    if not rows:
        raise UserError(f"dataset version {given.version_id[:16]} has no {'/'.join(config.splits)} rows that "
                        "passed the filters", hint="check `distillgate dataset status` and the splits")
    dataset = {"version_dir": str(given.version_dir), "rows_path": config.rows,
               "rows_sha256": sha256_file(config.rows) if config.rows else
               given.manifest.get("files", {}).get("rows.parquet"),
               "dataset_version": given.version_id, **provenance(rows)}
    return rows, dataset


def prepare(config: TrainConfig, *, keep_teacher: bool) -> Prepared:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rows, dataset = guarded_rows(config)  # golden / test / holdout rows are refused before any model is loaded
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
        "dataset": dataset,
        "student": {"parameters": total, "trainable": trainable,
                    "layers": getattr(student.config, "num_hidden_layers", None),
                    "layer_subset": getattr(student.config, "distillgate_layer_subset", None)},
        "teacher": config.teacher.model_dump() if config.teacher else None,
    }
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    return Prepared(rows, student, tokenizer, teacher, record)
