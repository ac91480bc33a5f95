"""Helpers for the dataset builder tests: small traffic files and working copies built from them."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distillgate.data.config import IngestConfig, parse_config
from distillgate.data.ingest import ingest_file
from distillgate.data.store import GeneratedSample, WorkingCopy

ROOT = Path(__file__).resolve().parent.parent
BANKING_TRAIN = ROOT / "data" / "banking77" / "train.csv"
BANKING_TEST = ROOT / "data" / "banking77" / "test.csv"
BANKING_LABELS = ROOT / "data" / "banking77" / "categories.json"


def banking_rows(path: Path = BANKING_TRAIN, limit: int | None = None) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows[:limit] if limit else rows


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def teacher_answer(label: str, explanation: str = "the customer asks about this") -> str:
    return json.dumps({"type": label, "explanation": explanation})


def make_dataset(tmp: Path, records: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None = None,
                 name: str = "ds") -> WorkingCopy:
    """A working copy holding ``records`` (keys: id, text, answer, optional group/ts/tags) as imported answers."""
    cfg: dict[str, Any] = {
        "ingest": {"columns": {"input": "text", "record_id": "id", "output": "answer", "group": "group",
                               "timestamp": "ts", "tags": "tags"}},
    }
    for key, value in (config or {}).items():
        cfg[key] = value
    full = [{"group": "", "ts": "", "tags": "", **r} for r in records]
    traffic = write_jsonl(tmp / f"{name}-traffic.jsonl", full)
    wc = WorkingCopy.create(tmp / name, cfg)
    result = ingest_file(traffic, IngestConfig.model_validate(cfg["ingest"]))
    wc.add_inputs(result.rows)
    return wc


def sample(input_id: str, index: int, answer: str, **extra: Any) -> GeneratedSample:
    """A generated sample as the generation job will hand it over (stamp and card as dicts)."""
    fields: dict[str, Any] = {
        "input_id": input_id,
        "sample_index": index,
        "output_raw": answer,
        "teacher_model": "local/smollm2-135m-instruct",
        "teacher_card": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "backend": "transformers",
                         "file_sha256": "ab" * 32, "quantisation": "q8_0", "chat_template_sha256": "cd" * 32,
                         "parameter_count": 134515008},
        "prompt_template_id": "intent-v1",
        "prompt_template_sha256": "ef" * 32,
        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64},
        "stamp": {"decision_id": f"d-{input_id}-{index}", "signature": "sig", "key_id": "k1"},
    }
    fields.update(extra)
    return GeneratedSample(**fields)


def default_config(**sections: Any) -> Any:
    return parse_config(dict(sections))
