"""Leakage-safe splits: whole components (source group + near-duplicate cluster) go to one split.

Rows that passed the filters are joined into components: rows of one input, one source group (account, document,
conversation) or one near-duplicate cluster are in the same component, transitively. Then:

1. **golden**: once a version is frozen the golden set is hash-locked (``golden_lock``: row id -> golden hash) and
   those rows stay golden; before that, ``split.golden.ids_file`` or a ``fraction`` of components is drawn.
2. **holdout**: every component holding a hard case (rare label, very long/short input, ambiguous samples, low
   teacher confidence, adversarial tag, "cannot answer" label) is held out whole.
3. the rest go to train/val/test by ``ratios``: by a seeded hash of the component (stable as rows are added), or,
   with ``by_time``, in order of the component's earliest timestamp (oldest to train).

Rows that failed filters get split ``excluded``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distillgate.data.config import SplitConfig
from distillgate.data.dedup import words
from distillgate.data.schema import Row
from distillgate.errors import NotFoundError, UserError


@dataclass
class SplitReport:
    counts: dict[str, int] = field(default_factory=dict)
    holdout_reasons: dict[str, int] = field(default_factory=dict)
    components: int = 0


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
