"""The build: normalise answers, run the filters, find duplicates, score disagreement, decontaminate, split.

``process(rows, config)`` is the pure core (used by the benchmarks); ``build(working_copy)`` runs it on a working
copy and writes back only rows that changed, skipping (and reporting) rows a reviewer changed meanwhile.

Order: normalise -> per-row filters (per task) -> sample agreement -> exact duplicates -> near-duplicate clusters
-> decontamination (eval sets + locked golden rows) -> review verdicts -> splits -> leakage check.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillgate.data.config import DatasetConfig, EvalSet
from distillgate.data.dedup import NearIndex, cluster_sketches, sketch
from distillgate.data.filters import ANSWER_REASONS, RowFilter, agreement_scores, compile_filters
from distillgate.data.ingest import read_records
from distillgate.data.leakage import LeakageReport, leakage_check
from distillgate.data.normalize import normalise_output
from distillgate.data.schema import Row
from distillgate.data.splits import SplitReport, assign_splits
from distillgate.data.store import WorkingCopy
from distillgate.errors import NotFoundError, UserError


@dataclass
class FilterReport:
    rows: int = 0
    passed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    reasons_by_label: dict[str, dict[str, int]] = field(default_factory=dict)
    clusters: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class BuildReport:
    filters: FilterReport
    split: SplitReport
    leakage: LeakageReport
    changed: int = 0
    conflicts: list[str] = field(default_factory=list)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: with a million live rows its full passes make the build quadratic.

    The pipeline creates no reference cycles; memory is freed by reference counting as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def normalise_rows(rows: Sequence[Row], config: DatasetConfig) -> list[bool]:
    """Fill ``output``/``teacher_label``/``label`` from ``output_raw``; return whether each answer parsed.

    A human edit stands: an edited row keeps the reviewer's label and, for a structured correction, the reviewer's
    answer (both read from ``review_after``).
    """
    cfg = config.normalise
    parsed: list[bool] = []
    for row in rows:
        result = normalise_output(row.output_raw or "", cfg, row.label_probs)
        row.teacher_label = result.label
        after = (row.review_after or {}) if row.edited else {}
        row.label = after.get("label", result.label)
        human_answer = after.get("output")
        row.output = human_answer if isinstance(human_answer, str) else result.output
        parsed.append(True if isinstance(human_answer, str) else result.parsed)
    return parsed


def load_eval_texts(sets: Sequence[EvalSet], base: Path | None = None) -> list[str]:
    texts: list[str] = []
    for item in sets:
        path = Path(item.path)
        if not path.exists() and base is not None and (base / path).exists():
            path = base / path
        if not path.exists():
            raise NotFoundError(f"decontamination set {item.path} does not exist", hint="fix decontamination[].path")
        for record in read_records(path, item.format):
            if item.column not in record:
                raise UserError(
                    f"decontamination set {path} has no column {item.column!r} (columns: {sorted(record)})",
                    hint="set decontamination[].column",
                )
            value = record[item.column]
            if value:
                texts.append(str(value))
    return texts


def filter_rows(
    rows: Sequence[Row],
    config: DatasetConfig,
    *,
    parsed: Sequence[bool],
    eval_texts: Sequence[str] = (),
    golden_lock: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> FilterReport:
    with paused_gc():
        return _filter_rows(rows, config, parsed=parsed, eval_texts=eval_texts, golden_lock=golden_lock, base=base)


def _filter_rows(
    rows: Sequence[Row],
    config: DatasetConfig,
    *,
    parsed: Sequence[bool],
    eval_texts: Sequence[str],
    golden_lock: Mapping[str, str] | None,
    base: Path | None,
) -> FilterReport:
    report = FilterReport(rows=len(rows))
    t0 = time.perf_counter()
    compiled: dict[str, RowFilter] = {}
    reasons: list[list[str]] = []
    for row, ok in zip(rows, parsed, strict=True):
        rf = compiled.get(row.task)
        if rf is None:
            rf = compiled[row.task] = compile_filters(config.filters_for(row.task), base=base,
                                                     normalise=config.normalise)
        reasons.append(rf.check(row, ok))
    t1 = time.perf_counter()

    # sample agreement (k samples per input)
    labels_by_input: dict[str, list[str | None]] = {}
    for row in rows:
        labels_by_input.setdefault(row.input_id, []).append(row.teacher_label)
    scores = agreement_scores(labels_by_input)
    for row, why in zip(rows, reasons, strict=True):
        row.agreement = scores[row.input_id] if len(labels_by_input[row.input_id]) > 1 else None
        rule = config.filters_for(row.task).disagreement
        if rule is not None and row.agreement is not None and row.agreement < rule.min_agreement:
            why.append("SAMPLE_DISAGREEMENT")
    t2 = time.perf_counter()

    # exact duplicates over distinct inputs (first seen wins), then near-duplicate clusters of the survivors
    order: list[str] = []
    text_of: dict[str, str] = {}
    for row in rows:
        if row.input_id not in text_of:
            text_of[row.input_id] = row.input
            order.append(row.input_id)
    sketches = sketch([text_of[i] for i in order], config.dedup)
    first_by_key: dict[int, str] = {}
    keeper: dict[str, str] = {}
    for input_id, key in zip(order, sketches.exact_keys, strict=True):
        keeper[input_id] = first_by_key.setdefault(key, input_id)
    positions = [p for p, i in enumerate(order) if keeper[i] == i]
    uniques = [order[p] for p in positions]
    t3 = time.perf_counter()
    clusters = cluster_sketches(sketches, config.dedup, positions)
    cluster_of = {i: uniques[c] for i, c in zip(uniques, clusters.clusters, strict=True)}
    report.clusters = len(set(clusters.clusters))
    for row, why in zip(rows, reasons, strict=True):
        first = keeper[row.input_id]
        row.exact_dup_of = None if first == row.input_id else first
        row.dup_cluster = cluster_of[first]
        fcfg = config.filters_for(row.task)
        if row.exact_dup_of is not None and fcfg.exact_duplicates:
            why.append("EXACT_DUPLICATE")
        elif row.dup_cluster != row.input_id and row.exact_dup_of is None and fcfg.near_duplicates:
            why.append("NEAR_DUPLICATE")
    t4 = time.perf_counter()

    # decontamination against eval sets and the locked golden rows
    locked = set(golden_lock or ())
    golden_inputs = [r.input for r in rows if r.row_id in locked]
    references = [*eval_texts, *golden_inputs]
    if references:
        index = NearIndex(references, config.dedup)
        candidates = [
            (row, why) for row, why in zip(rows, reasons, strict=True)
            if row.row_id not in locked and config.filters_for(row.task).decontaminate
        ]
        found = index.neighbours([row.input for row, _ in candidates])
        for (_row, why), hits in zip(candidates, found, strict=True):
            if hits:
                why.append("CONTAMINATED")
    t5 = time.perf_counter()

    for row, why in zip(rows, reasons, strict=True):
        if row.review_state in ("accepted", "corrected"):
            why[:] = [w for w in why if w not in ANSWER_REASONS]
        elif row.review_state == "rejected":
            why.append("REVIEW_REJECTED")
        row.filter_reasons = sorted(set(why))
        row.filter_status = "fail" if row.filter_reasons else "pass"
        for code in row.filter_reasons:
            report.reasons[code] = report.reasons.get(code, 0) + 1
            by_label = report.reasons_by_label.setdefault(code, {})
            label_key = row.label or "<none>"
            by_label[label_key] = by_label.get(label_key, 0) + 1
    report.passed = sum(1 for r in rows if r.filter_status == "pass")
    report.timings_s = {
        "row_filters": t1 - t0, "disagreement": t2 - t1, "sketch_and_exact_dup": t3 - t2, "near_dup": t4 - t3,
        "decontamination": t5 - t4,
    }
    return report


def process(
    rows: Sequence[Row],
    config: DatasetConfig,
    *,
    eval_texts: Sequence[str] = (),
    golden_lock: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> BuildReport:
    """Normalise, filter, dedup, split and leakage-check ``rows`` in place."""
    with paused_gc():
        parsed = normalise_rows(rows, config)
        filters = filter_rows(rows, config, parsed=parsed, eval_texts=eval_texts, golden_lock=golden_lock,
                              base=base)
        split = assign_splits(rows, config.split, golden_lock)
        leakage = leakage_check(rows, config.dedup)
    return BuildReport(filters=filters, split=split, leakage=leakage)


def build(wc: WorkingCopy) -> BuildReport:
    """Run ``process`` on the working copy's rows and save what changed."""
    rows = wc.rows()
    if not rows:
        raise UserError(
            f"{wc.root} has no generated rows to build",
            hint="ingest traffic with an output column, or run `distillgate dataset generate` first",
        )
    read_versions = {r.row_id: r.version for r in rows}
    golden_lock: dict[str, str] | None = wc.get_meta("golden_lock")
    eval_texts = load_eval_texts(wc.config.decontamination, base=wc.root)
    report = process(rows, wc.config, eval_texts=eval_texts, golden_lock=golden_lock, base=wc.root)
    report.changed, report.conflicts = wc.save_build(rows, read_versions)
    wc.set_meta("last_build", {"at": time.time(), "rows": len(rows), "passed": report.filters.passed})
    return report


def summary(report: BuildReport) -> dict[str, Any]:
    return {
        "rows": report.filters.rows,
        "passed": report.filters.passed,
        "reasons": dict(Counter(report.filters.reasons).most_common()),
        "clusters": report.filters.clusters,
        "splits": report.split.counts,
        "holdout_reasons": report.split.holdout_reasons,
        "leakage_hits": len(report.leakage.hits),
        "label_conflicts": len(report.leakage.conflicts),
        "label_conflicts_across_splits": report.leakage.conflicts_across,
        "label_conflicts_in_use": report.leakage.conflicts_in_use,
        "changed": report.changed,
        "conflicts": len(report.conflicts),
    }
