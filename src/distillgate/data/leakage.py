"""The leakage check: every test/golden/holdout row with a train neighbour at or above the similarity threshold,
and every label conflict.

Run after splitting (``distillgate dataset leakage``, and by every build). Similarity is the exact Jaccard of
word-shingle sets (``distillgate.data.dedup``); the train side is every trainable row (train and val).

A **label conflict** is one text (compared by its words: case, spacing and punctuation ignored) carrying two or
more labels. It is a leakage class of its own: across splits the test row's label is contradicted by a training
row (the score on it is decided by which copy the model learnt); within one split the training signal contradicts
itself. Conflicts are checked on the final ``label`` and on the traffic's ``reference_label``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillgate.data.config import DedupConfig
from distillgate.data.dedup import NearIndex, words
from distillgate.data.guard import PROTECTED_SPLITS, TRAINABLE_SPLITS
from distillgate.data.ingest import read_records
from distillgate.data.schema import Row
from distillgate.errors import UserError


@dataclass(frozen=True)
class LeakHit:
    row_id: str
    split: str
    input: str
    neighbour_row_id: str
    neighbour_input: str
    similarity: float


@dataclass(frozen=True)
class LabelConflict:
    """One text with more than one ``field`` value: ``rows`` maps each label to ``[(row_id, split), ...]``."""

    field: str
    text: str
    rows: dict[str, list[tuple[str, str]]]

    @property
    def splits(self) -> list[str]:
        return sorted({split for members in self.rows.values() for _, split in members})

    @property
    def in_use(self) -> bool:
        """Still two labels among the rows that are used (train/val/test/golden/holdout): not resolved by the
        builder setting copies aside (``excluded``, e.g. as exact duplicates)."""
        used = {label for label, members in self.rows.items()
                if any(split in PROTECTED_SPLITS or split in TRAINABLE_SPLITS for _, split in members)}
        return len(used) > 1

    @property
    def across_splits(self) -> bool:
        """A protected (test/golden/holdout) row and a trainable row disagree: the evaluation itself is at stake."""
        labels_by_side: dict[bool, set[str]] = {True: set(), False: set()}
        for label, members in self.rows.items():
            for _, split in members:
                if split in PROTECTED_SPLITS or split in TRAINABLE_SPLITS:
                    labels_by_side[split in PROTECTED_SPLITS].add(label)
        protected, trainable = labels_by_side[True], labels_by_side[False]
        return bool(protected and trainable and (len(protected | trainable) > 1))

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "text": self.text, "across_splits": self.across_splits, "in_use": self.in_use,
                "rows": {label: [{"row_id": r, "split": s} for r, s in members]
                         for label, members in self.rows.items()}}


@dataclass
class LeakageReport:
    threshold: float
    checked: int
    hits: list[LeakHit] = field(default_factory=list)
    conflicts: list[LabelConflict] = field(default_factory=list)

    @property
    def by_split(self) -> dict[str, int]:
        return dict(Counter(h.split for h in self.hits))

    @property
    def conflicts_across(self) -> int:
        return sum(c.across_splits for c in self.conflicts)

    @property
    def conflicts_in_use(self) -> int:
        return sum(c.in_use for c in self.conflicts)

    @property
    def clean(self) -> bool:
        """No protected row with a train neighbour, and no text with two labels among the rows in use."""
        return not self.hits and not self.conflicts_in_use


def _field(row: Row | Mapping[str, Any], name: str) -> Any:
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def _get(row: Row | Mapping[str, Any], name: str) -> Any:
    return row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)


def text_key(text: str) -> str:
    """What two texts must share to be "the same text": their words (case, spacing, punctuation ignored)."""
    return " ".join(words(text)) or text.strip().lower()


def label_conflicts(rows: Sequence[Row | Mapping[str, Any]], label_field: str = "label") -> list[LabelConflict]:
    """Every text that two or more inputs carry with different values of ``label_field``, in first-seen order.

    Rows without the field are skipped. The ``k`` samples of one input (same ``input_id``) disagreeing among
    themselves are teacher disagreement (``agreement``), not a conflict: only different inputs are compared.
    """
    groups: dict[str, list[tuple[str, str, str, str]]] = {}  # key -> [(input id, label, row_id, split)]
    texts: dict[str, str] = {}  # key -> the first text seen
    for row in rows:
        label = _get(row, label_field)
        if label is None:
            continue
        row_id, text = str(_get(row, "row_id")), str(_get(row, "input"))
        key = text_key(text)
        texts.setdefault(key, text)
        groups.setdefault(key, []).append(
            (str(_get(row, "input_id") or row_id), str(label), row_id, str(_get(row, "split"))))
    conflicts = []
    for key, members in groups.items():
        by_input: dict[str, set[str]] = {}
        for input_id, label, _, _ in members:
            by_input.setdefault(input_id, set()).add(label)
        every = set().union(*by_input.values())
        if len(by_input) < 2 or len(every) < 2 or all(v == every for v in by_input.values()):
            continue
        by_label: dict[str, list[tuple[str, str]]] = {}
        for _, label, row_id, split in members:
            by_label.setdefault(label, []).append((row_id, split))
        conflicts.append(LabelConflict(label_field, texts[key], by_label))
    return conflicts


def leakage_check(rows: Sequence[Row | Mapping[str, Any]], cfg: DedupConfig | None = None,
                  label_fields: Sequence[str] = ("label", "reference_label")) -> LeakageReport:
    """Report every protected row (test/golden/holdout) with a train/val neighbour at Jaccard >= cfg.threshold,
    and every label conflict on ``label_fields``."""
    dedup = cfg or DedupConfig()
    train = [r for r in rows if _field(r, "split") in TRAINABLE_SPLITS]
    protected = [r for r in rows if _field(r, "split") in PROTECTED_SPLITS]
    report = LeakageReport(threshold=dedup.threshold, checked=len(protected))
    for name in label_fields:
        report.conflicts.extend(label_conflicts(rows, name))
    if not train or not protected:
        return report
    index = NearIndex([_field(r, "input") for r in train], dedup)
    found = index.neighbours([_field(r, "input") for r in protected])
    for row, hits in zip(protected, found, strict=True):
        if hits:
            best = train[hits[0].index]
            report.hits.append(
                LeakHit(
                    row_id=_field(row, "row_id"), split=_field(row, "split"), input=_field(row, "input"),
                    neighbour_row_id=_field(best, "row_id"), neighbour_input=_field(best, "input"),
                    similarity=round(hits[0].similarity, 4),
                )
            )
    return report


def published_split_rows(files: Mapping[str, str | Path], *, input_column: str = "text", label_column: str = "label",
                         fmt: str | None = None) -> list[dict[str, Any]]:
    """The rows of a dataset's own published split files (``{"train": path, "test": path}``), ready for
    ``leakage_check``: ``row_id`` is ``<split>:<line>`` (1 = the first record), ``label`` the label column."""
    rows: list[dict[str, Any]] = []
    for split, path in files.items():
        for n, record in enumerate(read_records(path, fmt), start=1):
            missing = [c for c in (input_column, label_column) if c not in record]
            if missing:
                raise UserError(f"{path} record {n} has no column(s) {missing} (columns: {sorted(record)})",
                                hint="name the columns with --map input=COLUMN --map label=COLUMN")
            label = record[label_column]
            rows.append({"row_id": f"{split}:{n}", "split": split, "input": str(record[input_column]),
                         "label": None if label is None or label == "" else str(label)})
    return rows
