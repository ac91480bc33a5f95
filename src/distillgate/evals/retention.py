"""Retention on a classification suite: per-model scores, agreement and student/teacher ratios, by slice.

Each metric is reported as teacher, student, difference (student - teacher) and retention (student / teacher),
every one with a paired-bootstrap interval over items (see ``stats``). Slices reuse the same machinery on
their subset of items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distillgate.evals.answers import Answer
from distillgate.evals.stats import (
    DEFAULT_RESAMPLES,
    IntArray,
    Interval,
    encode,
    is_valid_json,
    macro_f1,
    paired_bootstrap,
    paired_mean_bootstrap,
    ratio,
    resample_indices,
)
from distillgate.evals.suites import Item, normalise

MEAN_METRICS = ("accuracy", "exact_match", "json_validity")


@dataclass(frozen=True)
class Comparison:
    """One metric for both models on one set of items."""

    metric: str
    teacher: Interval
    student: Interval
    difference: Interval
    retention: Interval

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "teacher": self.teacher.as_dict(), "student": self.student.as_dict(),
                "difference": self.difference.as_dict(), "retention": self.retention.as_dict()}


@dataclass(frozen=True)
class SliceResult:
    slice: str  # e.g. "label", "length", "golden"; "all" for the whole suite
    value: str
    n: int
    comparisons: list[Comparison]
    agreement: Interval

    def get(self, metric: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.metric == metric), None)

    def as_dict(self) -> dict[str, Any]:
        return {"slice": self.slice, "value": self.value, "n": self.n, "agreement": self.agreement.as_dict(),
                "metrics": {c.metric: c.as_dict() for c in self.comparisons}}


def per_item_scores(items: Sequence[Item], answers: Sequence[Answer], *, json_format: bool) -> dict[str, np.ndarray]:
    """0/1 per item: accuracy (parsed label == gold), exact_match (whole answer == gold), json_validity."""
    correct = [a.label is not None and a.label == it.gold for it, a in zip(items, answers, strict=True)]
    exact = [it.gold is not None and normalise(a.raw) == normalise(it.gold)
             for it, a in zip(items, answers, strict=True)]
    scores = {"accuracy": np.array(correct, dtype=np.float64), "exact_match": np.array(exact, dtype=np.float64)}
    if json_format:
        scores["json_validity"] = np.array([is_valid_json(a.raw) for a in answers], dtype=np.float64)
    return scores


def compare_slice(name: str, value: str, idx: IntArray, teacher_scores: dict[str, np.ndarray],
                  student_scores: dict[str, np.ndarray], codes: tuple[IntArray, IntArray, IntArray], *,
                  resamples: int, seed: int, with_f1_interval: bool) -> SliceResult:
    """Metrics on the items ``idx``; every interval of the slice shares one resample matrix."""
    n = len(idx)
    boot = resample_indices(n, resamples, seed)
    comparisons = []
    for metric in MEAN_METRICS:
        if metric not in teacher_scores:
            continue
        t, s, d, r = paired_mean_bootstrap(teacher_scores[metric][idx], student_scores[metric][idx], indices=boot)
        comparisons.append(Comparison(metric, t, s, d, r))
    gold, tpred, spred = (c[idx] for c in codes)
    if with_f1_interval:
        t_f1 = paired_bootstrap(n, lambda i: macro_f1(tpred[i], gold[i]), indices=boot)
        s_f1 = paired_bootstrap(n, lambda i: macro_f1(spred[i], gold[i]), indices=boot)
        d_f1 = paired_bootstrap(n, lambda i: macro_f1(spred[i], gold[i]) - macro_f1(tpred[i], gold[i]),
                                indices=boot)
        r_f1 = paired_bootstrap(n, lambda i: ratio(macro_f1(spred[i], gold[i]), macro_f1(tpred[i], gold[i])),
                                indices=boot)
    else:
        tv, sv = macro_f1(tpred, gold), macro_f1(spred, gold)
        t_f1, s_f1 = _point(tv, n), _point(sv, n)
        d_f1, r_f1 = _point(sv - tv, n), _point(ratio(sv, tv), n)
    comparisons.append(Comparison("macro_f1", t_f1, s_f1, d_f1, r_f1))
    agree = (tpred == spred) & (tpred >= 0)
    _, agreement, _, _ = paired_mean_bootstrap(agree.astype(np.float64), agree.astype(np.float64), indices=boot)
    return SliceResult(name, value, n, comparisons, agreement)


def _point(value: float, n: int) -> Interval:
    return Interval(value, float("nan"), float("nan"), n, 0, 0)


def retention_by_slice(items: Sequence[Item], teacher: Sequence[Answer], student: Sequence[Answer], *,
                       json_format: bool = False, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                       min_slice: int = 1) -> list[SliceResult]:
    """The ``all`` row first, then one row per (slice, value) with at least ``min_slice`` items."""
    vocab: dict[str, int] = {}
    gold = encode([it.gold for it in items], vocab)
    codes = (gold, encode([a.label for a in teacher], vocab), encode([a.label for a in student], vocab))
    t_scores = per_item_scores(items, teacher, json_format=json_format)
    s_scores = per_item_scores(items, student, json_format=json_format)
    everything = np.arange(len(items), dtype=np.int64)
    rows = [compare_slice("all", "all", everything, t_scores, s_scores, codes, resamples=resamples, seed=seed,
                          with_f1_interval=True)]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, item in enumerate(items):
        for key, value in item.slices.items():
            groups.setdefault((key, value), []).append(i)
    for (key, value), members in sorted(groups.items()):
        if len(members) < min_slice:
            continue
        rows.append(compare_slice(key, value, np.array(members, dtype=np.int64), t_scores, s_scores, codes,
                                  resamples=resamples, seed=seed, with_f1_interval=False))
    return rows
