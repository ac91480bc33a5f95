"""``eval --suite dataset --split golden`` offers the models the task's whole label set, not the split's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillgate.cli.eval_cmd import _load_suite
from distillgate.errors import UserError

ROWS = [
    {"row_id": "a", "input": "where is my card", "label": "card_arrival", "split": "golden"},
    {"row_id": "b", "input": "my top up failed", "label": "top_up_failed", "split": "train"},
    {"row_id": "c", "input": "what rate do you use", "label": "exchange_rate", "split": "test"},
]


def _write(tmp: Path) -> Path:
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_a_golden_split_gets_every_label_of_the_dataset(tmp_path: Path) -> None:
    suite = _load_suite("dataset", str(_write(tmp_path)), "golden", None, 0, "label", None)
    assert [it.item_id for it in suite.items] == ["a"]
    assert suite.labels == ["card_arrival", "exchange_rate", "top_up_failed"]
    prompt = suite.messages(suite.items[0])[0]["content"]
    assert "top_up_failed" in prompt and "exchange_rate" in prompt


def test_labels_come_from_the_manifest_or_a_labels_file(tmp_path: Path) -> None:
    path = _write(tmp_path)
    task_labels = ["card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_card"]
    (tmp_path / "manifest.json").write_text(json.dumps({"config": {"filters": {"allowed_labels": task_labels}}}))
    assert _load_suite("dataset", str(path), "golden", None, 0, "label", None).labels == task_labels
    (tmp_path / "labels.txt").write_text("refund\ncard_arrival\n")
    labels_file = str(tmp_path / "labels.txt")
    assert _load_suite("dataset", str(path), "golden", None, 0, "label", None, labels_file).labels == [
        "refund", "card_arrival"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="no label list"):
        _load_suite("dataset", str(path), "golden", None, 0, "label", None, str(tmp_path / "bad.json"))
