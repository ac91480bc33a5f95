"""The dataset build as it was before it streamed (commit d0f0bc0): every row in memory, one pass per step.

Kept verbatim as the oracle for tests/test_data_stream.py: the streaming build must give every row the same
verdicts (filters, duplicate clusters, splits) and the same reports as this code.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from distillgate.data.config import DatasetConfig, SplitConfig
from distillgate.data.dedup import NearIndex, cluster_sketches, sketch, words
from distillgate.data.filters import ANSWER_REASONS, RowFilter, agreement_scores, compile_filters
from distillgate.data.leakage import LeakageReport, leakage_check
from distillgate.data.pipeline import BuildReport, FilterReport, paused_gc
from distillgate.data.plan import normalise_rows
from distillgate.data.schema import Row
from distillgate.data.splits import SplitReport
from distillgate.errors import NotFoundError, UserError


def reference_process(
    rows: Sequence[Row],
    config: DatasetConfig,
    *,
    eval_texts: Sequence[str] = (),
    golden_lock: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> BuildReport:
    with paused_gc():
        parsed = normalise_rows(rows, config)
        filters = _filter_rows(rows, config, parsed=parsed, eval_texts=eval_texts, golden_lock=golden_lock,
                               base=base)
        split = assign_splits(rows, config.split, golden_lock)
        leakage: LeakageReport = leakage_check(rows, config.dedup)
    return BuildReport(filters=filters, split=split, leakage=leakage)


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


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _components(rows: Sequence[Row]) -> list[list[int]]:
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        keys = [f"i:{row.input_id}"]
        if row.source_group:
            keys.append(f"g:{row.source_group}")
        if row.dup_cluster:
            keys.append(f"c:{row.dup_cluster}")
        for key in keys:
            j = first.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    pos = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[pos])


def hard_case_reason(row: Row, cfg: SplitConfig, label_counts: Counter[str | None], long_cut: float | None,
                     short_cut: float | None) -> str | None:
    h = cfg.holdout
    if row.label in h.cannot_answer_labels:
        return "cannot_answer"
    if any(tag in h.adversarial_tags for tag in row.tags):
        return "adversarial"
    if row.agreement is not None and row.agreement < h.ambiguous_max_agreement:
        return "ambiguous"
    if (h.low_confidence_max_prob is not None and row.label_probs and not row.edited
            and max(row.label_probs.values()) < h.low_confidence_max_prob):
        return "low_confidence"
    if label_counts[row.label] <= h.rare_label_max_count:
        return "rare_label"
    n_words = len(words(row.input))
    if long_cut is not None and n_words > long_cut:
        return "long_input"
    if short_cut is not None and n_words < short_cut:
        return "short_input"
    return None


def _golden_ids_file(path: str) -> set[str]:
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"golden ids_file {p} does not exist", hint="one input_id per line")
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


def assign_splits(rows: Sequence[Row], cfg: SplitConfig, golden_lock: Mapping[str, str] | None = None) -> SplitReport:
    """Set ``split``/``split_reason`` on every row in place; only rows with ``filter_status == 'pass'`` are split."""
    report = SplitReport()
    live = [r for r in rows if r.filter_status == "pass"]
    for row in rows:
        if row.filter_status != "pass":
            row.split, row.split_reason = "excluded", "filtered"
    comps = _components(live)
    report.components = len(comps)
    label_counts: Counter[str | None] = Counter(r.label for r in live)
    lengths = [len(words(r.input)) for r in live]
    h = cfg.holdout
    long_cut = _quantile(lengths, h.long_input_quantile) if h.long_input_quantile is not None else None
    short_cut = _quantile(lengths, h.short_input_quantile) if h.short_input_quantile is not None else None
    locked = set(golden_lock or ())
    golden_inputs = _golden_ids_file(cfg.golden.ids_file) if cfg.golden.ids_file else None

    rest: list[tuple[list[int], str]] = []
    for comp in comps:
        members = [live[i] for i in comp]
        key = min(r.input_id for r in members)
        if locked:
            if any(r.row_id in locked for r in members):
                for r in members:
                    if r.row_id in locked:
                        r.split, r.split_reason = "golden", "locked"
                    else:  # shares a group or cluster with a locked golden row: never trainable
                        r.split, r.split_reason = "excluded", "golden_group"
                continue
        elif golden_inputs is not None:
            if any(r.input_id in golden_inputs for r in members):
                for r in members:
                    r.split, r.split_reason = "golden", "ids_file"
                continue
        elif _unit(cfg.seed, "golden:" + key) < cfg.golden.fraction:
            for r in members:
                r.split, r.split_reason = "golden", "sampled"
            continue
        if h.enabled:
            reasons = [hard_case_reason(r, cfg, label_counts, long_cut, short_cut) for r in members]
            first = next((x for x in reasons if x), None)
            if first:
                for r, why in zip(members, reasons, strict=True):
                    r.split, r.split_reason = "holdout", why or f"with_{first}"
                    report.holdout_reasons[r.split_reason] = report.holdout_reasons.get(r.split_reason, 0) + 1
                continue
        rest.append((comp, key))

    names: list[str] = [s for s in ("train", "val", "test") if s in cfg.ratios]
    if cfg.by_time:
        def earliest(item: tuple[list[int], str]) -> tuple[str, str]:
            stamps = [live[i].source_timestamp for i in item[0]]
            if any(s is None for s in stamps):
                raise UserError(
                    "split.by_time is on but some rows have no timestamp",
                    hint="map ingest.columns.timestamp to a column with ISO 8601 times, or set split.by_time=false",
                )
            return (min(s for s in stamps if s is not None), item[1])

        rest.sort(key=earliest)
        total = sum(len(c) for c, _ in rest) or 1
        done = 0
        for comp, _ in rest:
            position = done / total
            done += len(comp)
            split = _pick(names, cfg.ratios, position)
            for i in comp:
                live[i].split, live[i].split_reason = split, None
    else:
        for comp, key in rest:
            split = _pick(names, cfg.ratios, _unit(cfg.seed, key))
            for i in comp:
                live[i].split, live[i].split_reason = split, None
    report.counts = dict(Counter(r.split or "none" for r in rows))
    return report


def _pick(names: list[str], ratios: Mapping[str, float], u: float) -> str:
    acc = 0.0
    for name in names:
        acc += ratios[name]
        if u < acc:
            return name
    return names[-1]
