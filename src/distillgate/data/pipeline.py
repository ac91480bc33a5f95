"""The build: normalise answers, run the filters, find duplicates, score disagreement, decontaminate, split.

``process_stream(batches, config)`` is the core: rows stream past twice and only a few small values per row stay
in memory (``distillgate.data.plan``; the bound is in docs/dataset.md, "Memory"). ``process(rows, config)`` runs it
over a list in place; ``build(working_copy)`` runs it over the working copy's store and writes back only rows that
changed, skipping (and reporting) rows a reviewer changed meanwhile.

Order: normalise -> per-row filters (per task) -> sample agreement -> exact duplicates -> near-duplicate clusters
-> decontamination (eval sets + locked golden rows) -> review verdicts -> splits -> leakage check.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from distillgate.data.config import DatasetConfig, EvalSet
from distillgate.data.ingest import read_records
from distillgate.data.leakage import LeakageReport
from distillgate.data.plan import BuildPlan, FilterReport
from distillgate.data.schema import Row
from distillgate.data.splits import SplitReport
from distillgate.data.store import WorkingCopy
from distillgate.errors import NotFoundError, UserError


@dataclass
class BuildReport:
    filters: FilterReport
    split: SplitReport
    leakage: LeakageReport
    changed: int = 0
    conflicts: list[str] = field(default_factory=list)
    synthetic: dict[str, Any] = field(default_factory=dict)  # real vs synthetic rows per split, the train share


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


BATCH_ROWS = 8192


def _batches(rows: Sequence[Row], size: int = BATCH_ROWS) -> Iterator[Sequence[Row]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def process_stream(
    batches: Callable[[], Iterable[Sequence[Row]]],
    config: DatasetConfig,
    *,
    sink: Callable[[BuildPlan], Iterable[tuple[Sequence[Row], npt.NDArray[np.int64]]]] | None = None,
    eval_texts: Sequence[str] = (),
    golden_lock: Mapping[str, str] | None = None,
    base: Path | None = None,
    tmp_dir: str | Path | None = None,
) -> BuildReport:
    """The build over rows that stream past twice: ``batches()`` must give the same rows in the same order each call.

    Pass one reads every batch (``BuildPlan.first_pass``), the verdicts are decided as columns (``plan``), pass two
    reads the batches again and writes the verdicts into them. ``sink(plan)``, when given, runs the second pass
    itself and yields (rows, first-pass positions) it has read, to be given their verdicts (a working copy checks
    versions and saves there); else the second pass is ``batches()`` again, in order.
    """
    plan = BuildPlan(config, eval_texts=eval_texts, golden_lock=golden_lock, base=base, tmp_dir=tmp_dir)
    try:
        with paused_gc():
            plan.first_pass(batches())
            plan.plan()
            t0, c0 = time.perf_counter(), time.process_time()
            if sink is None:
                start = 0
                for batch in batches():
                    plan.apply(batch, np.arange(start, start + len(batch), dtype=np.int64))
                    start += len(batch)
            else:
                for batch, positions in sink(plan):
                    plan.apply(batch, positions)
            plan.timings["apply"], plan.timings["apply_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    finally:
        plan.close()
    return BuildReport(filters=plan.filter_report(), split=plan.split_report, leakage=plan.leakage_report(),
                       synthetic=plan.synthetic_report)


def process(
    rows: Sequence[Row],
    config: DatasetConfig,
    *,
    eval_texts: Sequence[str] = (),
    golden_lock: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> BuildReport:
    """Normalise, filter, dedup, split and leakage-check ``rows`` in place (the streaming build over a list)."""
    return process_stream(lambda: _batches(rows), config, eval_texts=eval_texts, golden_lock=golden_lock, base=base)


def build(wc: WorkingCopy) -> BuildReport:
    """Build the working copy's rows, streaming them from its store twice; save what changed.

    Rows are read a page at a time in ``rowid`` order. The second pass runs in one write transaction (a build is
    applied whole or not at all): a row whose version moved since the first pass was changed by someone else
    meanwhile and is skipped (reported as a conflict); a row added meanwhile is left for the next build.
    """
    if not wc.count_rows():
        raise UserError(
            f"{wc.root} has no generated rows to build",
            hint="ingest traffic with an output column, or run `distillgate dataset generate` first",
        )
    golden_lock: dict[str, str] | None = wc.get_meta("golden_lock")
    eval_texts = load_eval_texts(wc.config.decontamination, base=wc.root)
    rowids: list[npt.NDArray[np.int64]] = []
    versions: list[npt.NDArray[np.int64]] = []
    changed = 0
    conflicts: list[str] = []

    def first_pass() -> Iterator[Sequence[Row]]:
        for ids, batch in wc.iter_row_pages(BATCH_ROWS):
            rowids.append(np.asarray(ids, dtype=np.int64))
            versions.append(np.asarray([r.version for r in batch], dtype=np.int64))
            yield batch

    def second_pass(plan: BuildPlan) -> Iterator[tuple[Sequence[Row], npt.NDArray[np.int64]]]:
        nonlocal changed
        read_ids = np.concatenate(rowids) if rowids else np.zeros(0, dtype=np.int64)
        read_versions = np.concatenate(versions) if versions else np.zeros(0, dtype=np.int64)
        rowids.clear()
        versions.clear()
        with wc.transaction():
            for ids, batch in wc.iter_row_pages(BATCH_ROWS):
                at = np.searchsorted(read_ids, np.asarray(ids, dtype=np.int64)).tolist()
                mine: list[Row] = []
                mine_at: list[int] = []
                for rowid, p, row in zip(ids, at, batch, strict=True):
                    if p >= len(read_ids) or read_ids[p] != rowid:
                        continue  # added after the first pass: the next build sees it
                    if row.version != read_versions[p]:
                        conflicts.append(row.row_id)  # changed meanwhile: its verdicts are stale
                        continue
                    mine.append(row)
                    mine_at.append(p)
                positions = np.asarray(mine_at, dtype=np.int64)
                before = [r.content_sha256() for r in mine]
                yield mine, positions
                for row, digest in zip(mine, before, strict=True):
                    if row.content_sha256() != digest:
                        wc.update_row(row, row.version)
                        changed += 1

    report = process_stream(first_pass, wc.config, sink=second_pass, eval_texts=eval_texts,
                            golden_lock=golden_lock, base=wc.root)
    report.changed, report.conflicts = changed, conflicts
    wc.set_meta("last_build", {"at": time.time(), "rows": report.filters.rows, "passed": report.filters.passed})
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
        "synthetic": report.synthetic,
    }
