"""The leakage check: every test/golden/holdout row with a train neighbour at or above the similarity threshold.

Run after splitting (``distillgate dataset leakage``, and by every build). Similarity is the exact Jaccard of
word-shingle sets (``distillgate.data.dedup``); the train side is every trainable row (train and val).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distillgate.data.config import DedupConfig
from distillgate.data.dedup import NearIndex
from distillgate.data.guard import PROTECTED_SPLITS, TRAINABLE_SPLITS
from distillgate.data.schema import Row


@dataclass(frozen=True)
class LeakHit:
    row_id: str
    split: str
    input: str
    neighbour_row_id: str
    neighbour_input: str
    similarity: float


@dataclass
class LeakageReport:
    threshold: float
    checked: int
    hits: list[LeakHit] = field(default_factory=list)

    @property
    def by_split(self) -> dict[str, int]:
        return dict(Counter(h.split for h in self.hits))

    @property
    def clean(self) -> bool:
        return not self.hits


def _field(row: Row | Mapping[str, Any], name: str) -> Any:
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def leakage_check(rows: Sequence[Row | Mapping[str, Any]], cfg: DedupConfig | None = None) -> LeakageReport:
    """Report every protected row (test/golden/holdout) with a train/val neighbour at Jaccard >= cfg.threshold."""
    dedup = cfg or DedupConfig()
    train = [r for r in rows if _field(r, "split") in TRAINABLE_SPLITS]
    protected = [r for r in rows if _field(r, "split") in PROTECTED_SPLITS]
    report = LeakageReport(threshold=dedup.threshold, checked=len(protected))
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
