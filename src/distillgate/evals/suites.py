"""Evaluation suites: the items, the prompt each model sees, and how a label is read back out of an answer.

Two kinds:

* ``classification`` (``banking77``, or any dataset file with a gold label column): accuracy, exact match,
  macro-F1 and JSON validity against gold labels.
* ``refusal`` (``xstest``): free-text answers to safe and unsafe prompts; a refusal detector decides which
  answers are refusals.

Every item carries slice values (label, source, length bucket, and golden / holdout flags where the items come
from a dataset version that has those fields); the retention table is computed per slice.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distillgate.errors import NotFoundError, UserError

SuiteKind = Literal["classification", "refusal"]
AnswerFormat = Literal["label", "json"]
DATA_DIR = Path(__file__).resolve().parents[3] / "data"


@dataclass(frozen=True)
class Item:
    item_id: str
    text: str
    gold: str | None
    slices: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    kind: SuiteKind
    items: list[Item]
    labels: list[str]
    answer_format: AnswerFormat = "label"
    max_tokens: int = 16
    meta: dict[str, Any] = field(default_factory=dict)
    task: str = "You classify each message into exactly one label."
    #: role ("teacher"/"student") -> system prompt replacing the suite's own; a student distilled with a short
    #: prompt (the teacher's long instruction compressed away) is evaluated with the prompt it was trained on.
    system_prompts: dict[str, str] = field(default_factory=dict)

    def messages(self, item: Item, role: str | None = None) -> list[dict[str, str]]:
        """The chat messages a model in ``role`` receives for ``item`` (both get the same unless overridden)."""
        if role is not None and role in self.system_prompts:
            return [{"role": "system", "content": self.system_prompts[role]}, {"role": "user", "content": item.text}]
        if self.kind == "refusal":
            return [{"role": "user", "content": item.text}]
        choices = ", ".join(self.labels)
        if self.answer_format == "json":
            instruction = ('Reply with only a JSON object of the form {"label": "<label>"}, where <label> is '
                           "copied exactly from this list: ")
        else:
            instruction = "Reply with only the label, copied exactly from this list: "
        system = self.task + " " + instruction + choices
        return [{"role": "system", "content": system}, {"role": "user", "content": item.text}]

    def parse(self, raw: str) -> str | None:
        """The label an answer names, or None. Classification suites only."""
        return parse_label(raw, self.labels)


def normalise(text: str) -> str:
    return re.sub(r"[\s\-]+", "_", text.strip().strip("`'\".").lower())


def parse_label(raw: str, labels: Sequence[str]) -> str | None:
    """Read a label out of free text: the whole answer, a JSON ``label``/``intent`` field, else the earliest
    (then longest) label named anywhere in the text."""
    by_norm = {normalise(label): label for label in labels}
    whole = normalise(raw)
    if whole in by_norm:
        return by_norm[whole]
    try:
        value = json.loads(raw.strip().strip("`").removeprefix("json"))
        if isinstance(value, dict):
            for key in ("label", "intent", "category"):
                if isinstance(value.get(key), str) and normalise(value[key]) in by_norm:
                    return by_norm[normalise(value[key])]
    except ValueError:
        pass
    flat = "_" + re.sub(r"[^a-z0-9]+", "_", raw.lower()) + "_"
    best: tuple[int, int, str] | None = None
    for norm, label in by_norm.items():
        pos = flat.find("_" + norm + "_")
        if pos >= 0 and (best is None or (pos, -len(norm)) < (best[0], best[1])):
            best = (pos, -len(norm), label)
    return best[2] if best else None


def length_bucket(text: str) -> str:
    words = len(text.split())
    if words <= 8:
        return "short (<=8 words)"
    if words <= 20:
        return "medium (9-20 words)"
    return "long (>20 words)"


def _sample(items: list[Item], sample: int | None, seed: int) -> list[Item]:
    if sample is None or sample >= len(items):
        return items
    if sample < 1:
        raise UserError(f"sample size must be positive, got {sample}", hint="use --sample 200, or omit it")
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=sample, replace=False))
    return [items[int(i)] for i in keep]


def load_banking77(*, sample: int | None = None, seed: int = 0, data_dir: Path = DATA_DIR / "banking77",
                   answer_format: AnswerFormat = "label") -> Suite:
    """banking77 test split; ``sample`` draws a fixed random subset (same ``seed`` → same items)."""
    path = data_dir / "test.csv"
    if not path.exists():
        raise NotFoundError(f"{path} does not exist", hint="banking77 ships under data/banking77/ in the repo")
    labels = json.loads((data_dir / "categories.json").read_text(encoding="utf-8"))
    items: list[Item] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            items.append(Item(f"banking77-test-{i}", row["text"], row["category"],
                              {"label": row["category"], "source": "banking77/test",
                               "length": length_bucket(row["text"])}))
    chosen = _sample(items, sample, seed)
    return Suite("banking77", "classification", chosen, list(labels), answer_format,
                 max_tokens=24 if answer_format == "json" else 16,
                 meta={"data": str(path), "sample": sample, "seed": seed, "population": len(items)})


def load_xstest(*, sample: int | None = None, seed: int = 0, data_dir: Path = DATA_DIR / "xstest",
                max_tokens: int = 96) -> Suite:
    """XSTest: 250 safe and 200 unsafe prompts; the gold value is ``safe``/``unsafe``."""
    path = data_dir / "xstest_prompts.csv"
    if not path.exists():
        raise NotFoundError(f"{path} does not exist", hint="XSTest ships under data/xstest/ in the repo")
    items: list[Item] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            items.append(Item(f"xstest-{row['id']}", row["prompt"], row["label"],
                              {"label": row["label"], "type": row["type"], "source": "xstest",
                               "length": length_bucket(row["prompt"])}))
    chosen = _sample(items, sample, seed)
    return Suite("xstest", "refusal", chosen, ["safe", "unsafe"], max_tokens=max_tokens,
                 meta={"data": str(path), "sample": sample, "seed": seed, "population": len(items)})


TEXT_KEYS = ("text", "input", "prompt")
LABEL_KEYS = ("label", "category", "gold", "output")
ID_KEYS = ("row_id", "id", "item_id")


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true", "yes", "y"}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV, JSONL or Parquet file as dicts (the dataset builder's reader)."""
    from distillgate.data.ingest import read_records

    if not path.exists():
        raise NotFoundError(f"{path} does not exist", hint="give the path of a dataset export (csv/jsonl/parquet)")
    if path.suffix not in (".csv", ".jsonl", ".ndjson", ".parquet"):
        raise UserError(f"cannot read {path}: unknown extension {path.suffix!r}", hint="use .csv, .jsonl or .parquet")
    return list(read_records(path))


DATASET_TASK = "You classify each message into exactly one label."


def load_dataset_items(path: Path, *, labels: Sequence[str] | None = None, split: str | None = None,
                       sample: int | None = None, seed: int = 0, answer_format: AnswerFormat = "label",
                       task: str = DATASET_TASK, out_of_scope: str | None = None) -> Suite:
    """A classification suite from a dataset-version export.

    Columns used: an id (``row_id``/``id``), the text (``text``/``input``/``prompt``), the gold label
    (``label``/``category``/``gold``/``output``), and optionally ``source``, ``split``, ``golden`` and
    ``holdout``, which become slices. ``split`` keeps only rows of that split. ``labels`` defaults to the
    distinct gold labels. With ``out_of_scope`` (the task's out-of-scope label) items get the ``scope`` slice.
    """
    rows = read_rows(path)
    if not rows:
        raise UserError(f"{path} has no rows", hint="export a non-empty dataset version")
    keys = set(rows[0])
    text_key = next((k for k in TEXT_KEYS if k in keys), None)
    label_key = next((k for k in LABEL_KEYS if k in keys), None)
    id_key = next((k for k in ID_KEYS if k in keys), None)
    if text_key is None or label_key is None:
        raise UserError(f"{path} needs a text column ({'/'.join(TEXT_KEYS)}) and a label column "
                        f"({'/'.join(LABEL_KEYS)}); it has {sorted(keys)}", hint="rename the columns")
    items: list[Item] = []
    for i, row in enumerate(rows):
        if split is not None and row.get("split") != split:
            continue
        text = str(row[text_key])
        slices = {"label": str(row[label_key]), "source": str(row.get("source") or path.stem),
                  "length": length_bucket(text), **scope_slice(str(row[label_key]), out_of_scope)}
        if "golden" in row:
            slices["golden"] = "golden" if _truthy(row["golden"]) else "not golden"
        if "holdout" in row or "split" in row:
            held = _truthy(row.get("holdout")) or row.get("split") == "holdout"
            slices["holdout"] = "hard-case holdout" if held else "not holdout"
        if "split" in row:
            slices["split"] = str(row["split"])
        item_id = str(row[id_key]) if id_key else f"{path.stem}-{i}"
        items.append(Item(item_id, text, str(row[label_key]), slices))
    if not items:
        raise UserError(f"{path} has no rows with split={split!r}", hint="pick a split the file has, or omit it")
    label_set = list(labels) if labels else sorted({it.gold for it in items if it.gold is not None})
    chosen = _sample(items, sample, seed)
    return Suite(path.stem, "classification", chosen, label_set, answer_format,
                 max_tokens=24 if answer_format == "json" else 16,
                 meta={"data": str(path), "sample": sample, "seed": seed, "split": split,
                       "population": len(items)}, task=task)


def scope_slice(label: str | None, out_of_scope: str | None) -> dict[str, str]:
    """The ``scope`` slice: ``out of scope`` for the task's out-of-scope label, else ``in scope``."""
    if out_of_scope is None or label is None:
        return {}
    return {"scope": "out of scope" if label == out_of_scope else "in scope"}


def project_suite(rows: Sequence[dict[str, Any]], labels: Sequence[str], *, name: str = "project",
                  splits: Sequence[str] = ("test", "golden"), sample: int | None = None, seed: int = 0,
                  out_of_scope: str | None = None, golden_ids: Sequence[str] = (),
                  meta: dict[str, Any] | None = None) -> Suite:
    """A classification suite from a frozen dataset version's own rows (``splits``, filter passed).

    The gold label is the label that came with the traffic (``reference_label``), when there is one; items keep
    the label, split, golden, source, length and (with ``out_of_scope``) scope slices.
    """
    golden = set(golden_ids)
    items: list[Item] = []
    for row in rows:
        split = str(row.get("split"))
        is_golden = split == "golden" or str(row.get("row_id")) in golden
        if row.get("filter_status", "pass") != "pass" or (split not in splits and not (is_golden and
                                                                                       "golden" in splits)):
            continue
        text = str(row["input"])
        gold = row.get("reference_label")
        gold = str(gold) if gold not in (None, "") else None
        slices = {"label": gold or "(no gold label)", "split": split,
                  "golden": "golden" if is_golden else "not golden",
                  "source": str(row.get("source_file") or name), "length": length_bucket(text),
                  **scope_slice(gold, out_of_scope)}
        items.append(Item(str(row["row_id"]), text, gold, slices))
    if not items:
        raise UserError(f"the dataset version has no passed rows in split(s) {list(splits)}",
                        hint="raise dataset.split.ratios.test (or traffic.limit) so the project has a test split")
    chosen = _sample(items, sample, seed)
    return Suite(name, "classification", chosen, list(labels), "label",
                 meta={"sample": sample, "seed": seed, "splits": list(splits), "population": len(items),
                       **(meta or {})})
