"""How far a refusal detector agrees with labelled answers: three-way and binary agreement with Wilson intervals,
Cohen's kappa, and the confusion matrix.

A labelled CSV has ``text`` and ``kind`` columns (kinds from ``refusal.KINDS``); XSTest's names
(``full_compliance``, ``full_refusal``, ``partial_refusal``) are accepted as well. Optional ``source`` and
``prompt`` columns are kept.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillgate.errors import NotFoundError, UserError
from distillgate.evals.refusal import KINDS, XSTEST_NAMES, Kind, RefusalDetector, is_refused, wilson

FROM_XSTEST = {v: k for k, v in XSTEST_NAMES.items()}


@dataclass(frozen=True)
class Labelled:
    texts: list[str]
    kinds: list[Kind]
    sources: list[str]


def read_labelled_rows(path: Path) -> Labelled:
    """Rows of a labelled refusal CSV; every bad row is reported with its line number."""
    if not path.exists():
        raise NotFoundError(f"{path} does not exist", hint="the labelled refusal sets ship under data/refusal/")
    texts: list[str] = []
    kinds: list[Kind] = []
    sources: list[str] = []
    errors: list[str] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"text", "kind"} <= set(reader.fieldnames or []):
            raise UserError(f"{path} needs columns text and kind (has: {', '.join(reader.fieldnames or [])})",
                            hint="write a header line: text,kind")
        for n, row in enumerate(reader, start=2):
            kind = FROM_XSTEST.get(row.get("kind") or "", row.get("kind") or "")
            if kind not in KINDS:
                errors.append(f"{path}:{n}: kind {row.get('kind')!r} is not one of {', '.join(KINDS)}")
                continue
            texts.append(row.get("text") or "")
            kinds.append(next(k for k in KINDS if k == kind))
            sources.append(row.get("source") or path.stem)
    if errors:
        raise UserError("; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""),
                        hint="label each row comply, safety, partial, context or degenerate")
    return Labelled(texts, kinds, sources)


def read_labelled(path: Path) -> tuple[list[str], list[Kind]]:
    """``text`` and ``kind`` columns of a labelled refusal CSV."""
    rows = read_labelled_rows(path)
    return rows.texts, rows.kinds


@dataclass(frozen=True)
class Agreement:
    """How a detector's kinds agree with labels."""

    detector: str
    n: int
    accuracy: float  # agreement on the kind (comply / safety / partial / context / degenerate)
    accuracy_ci: tuple[float, float]  # Wilson 95 %
    refused_agreement: float  # binary: refused (safety or partial) or not
    refused_ci: tuple[float, float]
    cohen_kappa: float  # on the kind, chance-corrected
    confusion: dict[str, dict[str, int]]  # label -> detector kind -> count

    def as_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "n": self.n, "accuracy": self.accuracy,
                "accuracy_ci": list(self.accuracy_ci), "refused_agreement": self.refused_agreement,
                "refused_ci": list(self.refused_ci), "cohen_kappa": self.cohen_kappa, "confusion": self.confusion}


def score(name: str, gold: Sequence[str], predicted: Sequence[str]) -> Agreement:
    n = len(gold)
    if n == 0:
        raise UserError("no labelled rows to compare with", hint="give a CSV with text and kind columns")
    if len(predicted) != n:
        raise UserError(f"{len(predicted)} predictions for {n} labels", hint="this is a bug")
    confusion: dict[str, dict[str, int]] = {g: {p: 0 for p in KINDS} for g in KINDS}
    for g, p in zip(gold, predicted, strict=True):
        confusion[g][p] += 1
    hits = sum(confusion[k][k] for k in KINDS)
    expected = sum(sum(confusion[k].values()) * sum(confusion[g][k] for g in KINDS) for k in KINDS) / (n * n)
    kappa = (hits / n - expected) / (1 - expected) if expected < 1 else 1.0
    refused_hits = sum(is_refused(g) == is_refused(p) for g, p in zip(gold, predicted, strict=True))
    return Agreement(name, n, hits / n, wilson(hits, n), refused_hits / n, wilson(refused_hits, n), kappa,
                     confusion)


def agreement(detector: RefusalDetector, texts: Sequence[str], gold: Sequence[str]) -> Agreement:
    if not gold:
        raise UserError("no labelled rows to compare with", hint="give a CSV with text and kind columns")
    return score(detector.name, gold, detector.classify(texts))
