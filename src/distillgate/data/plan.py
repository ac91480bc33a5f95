"""The build's dataset-wide verdicts, computed from columns while rows stream past twice.

``BuildPlan.first_pass(batches)`` reads every row once, in order, a batch at a time: it normalises the answer, runs
the per-row filters and keeps a few small values per row (``_Columns``); the input texts are sketched and spilled to
disk (``distillgate.data.spill``). ``plan`` then decides everything that needs more than one row — sample
agreement, exact duplicates, near-duplicate clusters, decontamination, review verdicts, splits, the leakage check —
as arrays. ``apply(rows, positions)`` writes the verdicts into rows read again (the second pass), and ``report``
gives the reports. No ``Row`` outlives its batch.

The rules are those of the row-at-a-time build they replace (tests/_build_reference.py is that build, kept as the
oracle; tests/test_data_stream.py checks every verdict and report against it). Memory: docs/dataset.md, "Memory".
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from distillgate.data.config import DatasetConfig, FiltersConfig
from distillgate.data.dedup import sketch, words
from distillgate.data.filters import ANSWER_REASONS, REASONS, RowFilter, compile_filters
from distillgate.data.guard import PROTECTED_SPLITS, TRAINABLE_SPLITS
from distillgate.data.leakage import LeakageReport, LeakHit, label_conflicts, text_key
from distillgate.data.normalize import normalise_output
from distillgate.data.schema import Row
from distillgate.data.spill import SketchSpill, best_neighbours, clusters, spilled_band_keys
from distillgate.data.splits import (
    SPLIT_NAMES,
    SPLIT_REASONS,
    SplitInputs,
    assign_split_columns,
    golden_ids_file,
)
from distillgate.data.synthetic import synthetic_share
from distillgate.minhash import band_keys

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
CODES = tuple(REASONS)  # bit i of a row's reason mask is CODES[i]
_BIT = {code: 1 << i for i, code in enumerate(CODES)}
_ANSWER_MASK = sum(_BIT[c] for c in ANSWER_REASONS)
_REVIEW = {"accepted": 1, "corrected": 1, "rejected": 2}
_PROTECTED = np.array([name in PROTECTED_SPLITS for name in SPLIT_NAMES])  # the leakage check's two sides
_TRAINABLE = np.array([name in TRAINABLE_SPLITS for name in SPLIT_NAMES])


@dataclass
class FilterReport:
    rows: int = 0
    passed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    reasons_by_label: dict[str, dict[str, int]] = field(default_factory=dict)
    clusters: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)


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


@dataclass
class _Task:
    filters: FiltersConfig
    check: RowFilter


class _Columns:
    """The first pass's per-row values, appended a batch at a time."""

    def __init__(self) -> None:
        self.input_ids: list[pa.Array] = []
        self.groups: list[pa.Array] = []
        self.stamps: list[pa.Array] = []
        self.parts: dict[str, list[npt.NDArray[np.generic]]] = {
            k: [] for k in ("mask", "task", "teacher_label", "label", "review", "locked", "ids", "pre_hard",
                            "low_conf", "n_words", "conflict_ref", "text_key", "synthetic")}

    def add(self, name: str, values: Sequence[int] | Sequence[bool], dtype: type[np.generic]) -> None:
        self.parts[name].append(np.asarray(values, dtype=dtype))

    def take(self, name: str, dtype: type[np.generic]) -> npt.NDArray[Any]:
        parts = self.parts.pop(name)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _encode(chunks: list[pa.Array]) -> tuple[I32, pa.Array]:
    """Dictionary codes (-1 for null) and the dictionary of a column of strings."""
    if not chunks:
        return np.zeros(0, dtype=np.int32), pa.array([], pa.string())
    encoded = pa.chunked_array(chunks, pa.string()).combine_chunks().dictionary_encode()
    chunks.clear()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    dictionary = encoded.dictionary
    del encoded
    pa.default_memory_pool().release_unused()  # the hash table and the combined copy: back to the system
    return codes, dictionary


def _ranks(dictionary: pa.Array) -> I32:
    """Rank of each dictionary string in code-point order (Python's ``str`` order)."""
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank


class BuildPlan:
    """One build: ``first_pass`` over the rows, ``plan``, then ``apply`` to the rows read again, and ``report``."""

    def __init__(self, config: DatasetConfig, *, eval_texts: Sequence[str] = (),
                 golden_lock: Mapping[str, str] | None = None, base: Path | None = None,
                 tmp_dir: str | Path | None = None) -> None:
        self.config = config
        self.eval_texts = eval_texts
        self.locked = frozenset(golden_lock or ())
        self.base = base
        self.tmp_dir = tmp_dir
        self.timings: dict[str, float] = {}
        self._tasks: dict[str, int] = {}
        self._task_list: list[_Task] = []
        self._labels: dict[str | None, int] = {}
        h = config.split.holdout
        self._need_words = h.enabled and (h.long_input_quantile is not None or h.short_input_quantile is not None)
        ids = golden_ids_file(config.split.golden.ids_file) if config.split.golden.ids_file else None
        self._ids = ids if not self.locked else None  # a golden lock overrides the ids file
        self._golden_texts: list[str] = []
        self._cols = _Columns()
        self.n = 0

    # -- first pass ----------------------------------------------------------------------------------------
    def _task(self, name: str) -> int:
        code = self._tasks.get(name)
        if code is None:
            fcfg = self.config.filters_for(name)
            check = compile_filters(fcfg, base=self.base, normalise=self.config.normalise)
            code = self._tasks[name] = len(self._task_list)
            self._task_list.append(_Task(fcfg, check))
        return code

    def _label(self, label: str | None) -> int:
        code = self._labels.get(label)
        if code is None:
            code = self._labels[label] = len(self._labels)
        return code

    def first_pass(self, batches: Iterable[Sequence[Row]]) -> None:
        t0 = _clock()
        sketching = np.zeros(2)
        h = self.config.split.holdout
        cannot, adversarial = set(h.cannot_answer_labels), set(h.adversarial_tags)
        self.spill = SketchSpill(self.config.dedup, self.tmp_dir)
        cols = self._cols
        for batch in batches:
            parsed = normalise_rows(batch, self.config)
            tasks = [self._task(r.task) for r in batch]
            masks = []
            for row, ok, t in zip(batch, parsed, tasks, strict=True):
                bits = 0
                for code in self._task_list[t].check.check(row, ok):
                    bits |= _BIT[code]
                masks.append(bits)
            cols.add("mask", masks, np.uint32)
            cols.add("task", tasks, np.int16)
            cols.add("teacher_label", [self._label(r.teacher_label) for r in batch], np.int32)
            cols.add("label", [self._label(r.label) for r in batch], np.int32)
            cols.add("conflict_ref", [self._label(r.reference_label) for r in batch], np.int32)
            cols.add("text_key", [hash(text_key(r.input)) for r in batch], np.int64)
            cols.add("review", [_REVIEW.get(r.review_state, 0) for r in batch], np.int8)
            cols.add("synthetic", [r.synthetic is not None for r in batch], np.bool_)
            locked = [r.row_id in self.locked for r in batch]
            cols.add("locked", locked, np.bool_)
            self._golden_texts.extend(r.input for r, lk in zip(batch, locked, strict=True) if lk)
            if self._ids is not None:
                cols.add("ids", [r.input_id in self._ids for r in batch], np.bool_)
            cols.add("pre_hard", [1 if r.label in cannot else 2 if any(t in adversarial for t in r.tags) else 0
                                  for r in batch], np.int8)
            lc = h.low_confidence_max_prob
            cols.add("low_conf", [lc is not None and bool(r.label_probs) and not r.edited
                                  and max(r.label_probs.values()) < lc  # type: ignore[union-attr]
                                  for r in batch], np.bool_)
            if self._need_words:
                cols.add("n_words", [len(words(r.input)) for r in batch], np.int32)
            cols.input_ids.append(pa.array([r.input_id for r in batch], pa.string()))
            cols.groups.append(pa.array([r.source_group or None for r in batch], pa.string()))
            if self.config.split.by_time:
                cols.stamps.append(pa.array([r.source_timestamp for r in batch], pa.string()))
            s0 = _clock()
            self.spill.add([r.input for r in batch])
            sketching += _clock() - s0
            self.n += len(batch)
        self.spill.finish()
        self._phase("first_pass", _clock() - t0)  # read, normalise, per-row filters, sketch and spill
        self._phase("sketch", sketching)

    # -- dataset-wide verdicts -----------------------------------------------------------------------------
    def plan(self) -> None:
        t0 = _clock()
        cols, cfg = self._cols, self.config
        self.mask = cols.take("mask", np.uint32).astype(np.uint32)
        task = cols.take("task", np.int16)
        per_task = self._task_list

        # distinct inputs, numbered in order of first appearance
        codes, dictionary = _encode(cols.input_ids)
        uniq, first = np.unique(codes, return_index=True)
        order = np.argsort(first, kind="stable")
        renumber = np.empty(len(uniq), dtype=np.int32)
        renumber[uniq[order]] = np.arange(len(uniq), dtype=np.int32)
        self.input_idx = renumber[codes]
        del codes, renumber
        self.dictionary = dictionary.take(pa.array(uniq[order]))
        del dictionary
        first_row = first[order].astype(np.int32)
        del uniq, first, order
        n_inputs = len(first_row)

        # sample agreement: share of an input's samples naming its majority teacher label
        teacher = cols.take("teacher_label", np.int32)
        per_input = np.bincount(self.input_idx, minlength=n_inputs)
        n_labels = max(1, len(self._labels))
        pair, pair_counts = np.unique(self.input_idx.astype(np.int64) * n_labels + teacher, return_counts=True)
        del teacher
        top = np.zeros(n_inputs, dtype=np.int64)
        np.maximum.at(top, pair // n_labels, pair_counts)
        del pair, pair_counts
        self.agreement = np.where(per_input > 1, top / np.maximum(per_input, 1), np.nan)  # per input
        del top, per_input
        min_agree = np.array([t.filters.disagreement.min_agreement if t.filters.disagreement else -1.0
                              for t in per_task] or [-1.0])
        disagree = self.agreement[self.input_idx] < min_agree[task]  # NaN compares False
        self.mask[disagree] |= _BIT["SAMPLE_DISAGREEMENT"]
        del disagree
        t1 = _clock()

        # exact duplicates over distinct inputs (first seen wins), then near-duplicate clusters of the survivors
        _, first_key, key_of = np.unique(self.spill.exact_keys[first_row], return_index=True, return_inverse=True)
        self.keeper = first_key[key_of].astype(np.int32)
        del first_key, key_of
        uniques = np.flatnonzero(self.keeper == np.arange(n_inputs)).astype(np.int32)
        t2 = _clock()
        spill = self.spill
        unique_rows = first_row[uniques]
        reps = clusters(spilled_band_keys(spill, unique_rows), cfg.dedup.bands, len(uniques),
                        lambda i: spill.shingle_set(int(unique_rows[i])), cfg.dedup.threshold)
        self.n_clusters = len(np.unique(reps))
        cluster_of = np.empty(n_inputs, dtype=np.int32)
        cluster_of[uniques] = uniques[reps]
        self.cluster = cluster_of[self.keeper]
        del cluster_of, reps, uniques
        exact = self.keeper[self.input_idx] != self.input_idx
        exact_on = np.array([t.filters.exact_duplicates for t in per_task] or [False])[task]
        self.mask[exact & exact_on] |= _BIT["EXACT_DUPLICATE"]
        del exact_on
        near = ~exact & (self.cluster[self.input_idx] != self.input_idx)
        del exact
        near_on = np.array([t.filters.near_duplicates for t in per_task] or [False])[task]
        self.mask[near & near_on] |= _BIT["NEAR_DUPLICATE"]
        del near, near_on, first_row
        t3 = _clock()

        # decontamination against eval sets and the locked golden rows
        locked = cols.take("locked", np.bool_).astype(bool)
        references = [*self.eval_texts, *self._golden_texts]
        if references:
            decon = np.array([t.filters.decontaminate for t in per_task] or [False])[task]
            queries = np.flatnonzero(~locked & decon)
            refs = sketch(references, cfg.dedup)
            rows_per_band = cfg.dedup.num_perm // cfg.dedup.bands
            prefix = [band_keys(refs.signatures, b, rows_per_band) for b in range(cfg.dedup.bands)]
            n_ref = len(references)
            sim, _ = best_neighbours(
                spilled_band_keys(spill, queries, prefix), cfg.dedup.bands, n_ref, len(queries),
                lambda i: refs.shingle_set(i) if i < n_ref else spill.shingle_set(int(queries[i - n_ref])),
                cfg.dedup.threshold)
            self.mask[queries[sim >= 0]] |= _BIT["CONTAMINATED"]
        del task
        t4 = _clock()

        review = cols.take("review", np.int8)
        self.mask[review == 1] &= np.uint32(~_ANSWER_MASK & 0xFFFFFFFF)
        self.mask[review == 2] |= _BIT["REVIEW_REJECTED"]
        del review
        self.label = cols.take("label", np.int32)

        # splits (synthetic rows only ever train: splits.py)
        synthetic = cols.take("synthetic", np.bool_).astype(bool)
        group, _ = _encode(cols.groups)
        ts_rank = None
        if cfg.split.by_time:
            stamp, stamps = _encode(cols.stamps)
            ts_rank = np.where(stamp >= 0, _ranks(stamps)[np.maximum(stamp, 0)] if len(stamps) else -1, -1)
        dictionary = self.dictionary
        inputs = SplitInputs(
            live=self.mask == 0, input_idx=self.input_idx, input_rank=_ranks(dictionary),
            input_ids=lambda idx: dictionary.take(pa.array(idx)).to_pylist(),
            cluster_input=self.cluster, cluster_named=pc.greater(pc.utf8_length(dictionary.take(
                pa.array(self.cluster))), 0).to_numpy(zero_copy_only=False),
            group=group, locked=locked,
            ids_member=cols.take("ids", np.bool_).astype(bool) if self._ids is not None else None,
            label=self.label, pre_hard=cols.take("pre_hard", np.int8).astype(np.int8),
            low_confidence=cols.take("low_conf", np.bool_).astype(bool), agreement=self.agreement,
            n_words=cols.take("n_words", np.int32) if self._need_words else None,
            ts_rank=ts_rank, synthetic=synthetic if synthetic.any() else None)
        result = assign_split_columns(inputs, cfg.split, bool(self.locked))
        del inputs, group, locked
        self.split, self.split_reason, self.split_report = result.split, result.reason, result.report
        self.synthetic_report = synthetic_share(self.split, synthetic, cfg.synthetic.max_train_share)
        t5 = _clock()

        # the leakage check: protected rows with a trainable neighbour
        train = np.flatnonzero(_TRAINABLE[self.split]).astype(np.int32)
        self.protected = np.flatnonzero(_PROTECTED[self.split]).astype(np.int32)
        self.leak_sim = np.zeros(0)
        self.leak_ref: npt.NDArray[np.signedinteger[Any]] = np.zeros(0, dtype=np.int64)
        self.leak_at: npt.NDArray[np.signedinteger[Any]] = np.zeros(0, dtype=np.int64)
        if len(train) and len(self.protected):
            items = np.concatenate((train, self.protected))
            sim, ref = best_neighbours(spilled_band_keys(spill, items), cfg.dedup.bands, len(train),
                                       len(self.protected), lambda i: spill.shingle_set(int(items[i])),
                                       cfg.dedup.threshold)
            hit = sim >= 0
            self.leak_at, self.leak_sim, self.leak_ref = self.protected[hit], sim[hit], train[ref[hit]]
        self._leak_rows: dict[int, tuple[str, str]] = {}
        self._wanted = set(self.leak_at.tolist()) | set(self.leak_ref.tolist())
        self._conflict_at = self._conflict_candidates()
        self._conflict_rows: dict[int, dict[str, object]] = {}
        spill.close()
        t6 = _clock()
        for name, (a, b) in {"disagreement": (t0, t1), "exact_dup": (t1, t2), "near_dup": (t2, t3),
                             "decontamination": (t3, t4), "splits": (t4, t5), "leakage": (t5, t6)}.items():
            self._phase(name, b - a)

    def _phase(self, name: str, took: npt.NDArray[np.float64]) -> None:
        """Record a phase's wall-clock seconds (``name``) and CPU seconds (``name_cpu``)."""
        self.timings[name], self.timings[name + "_cpu"] = float(took[0]), float(took[1])

    def _conflict_candidates(self) -> set[int]:
        """Positions of rows whose text (``leakage.text_key``) carries two labels or reference labels: the
        few rows ``leakage.label_conflicts`` is then run on, with the second pass's row ids and splits."""
        key = self._cols.take("text_key", np.int64).astype(np.int64)
        none = self._labels.get(None, -1)
        wanted: set[int] = set()
        for code in (self.label.astype(np.int64), self._cols.take("conflict_ref", np.int32).astype(np.int64)):
            has = np.flatnonzero(code != none)
            if not len(has):
                continue
            pairs = np.unique(np.stack((key[has], code[has])), axis=1)
            keys, per_key = np.unique(pairs[0], return_counts=True)
            multi = keys[per_key > 1]
            wanted.update(has[np.isin(key[has], multi)].tolist())
        return wanted

    # -- second pass -----------------------------------------------------------------------------------------
    def apply(self, rows: Sequence[Row], positions: I64) -> None:
        """Write the verdicts of ``positions`` (first-pass order) into ``rows`` read again."""
        normalise_rows(rows, self.config)
        inp = self.input_idx[positions]
        keeper = self.keeper[inp]
        cluster = self.cluster[inp]
        keeper_ids = self.dictionary.take(pa.array(keeper)).to_pylist()
        cluster_ids = self.dictionary.take(pa.array(cluster)).to_pylist()
        for k, (row, p) in enumerate(zip(rows, positions.tolist(), strict=True)):
            agreement = float(self.agreement[inp[k]])
            row.agreement = None if agreement != agreement else agreement
            row.exact_dup_of = None if keeper[k] == inp[k] else keeper_ids[k]
            row.dup_cluster = cluster_ids[k]
            bits = int(self.mask[p])
            row.filter_reasons = [c for c in _SORTED if bits & _BIT[c]]
            row.filter_status = "fail" if bits else "pass"
            row.split = SPLIT_NAMES[self.split[p]]
            row.split_reason = SPLIT_REASONS[self.split_reason[p]]
            if p in self._wanted:
                self._leak_rows[p] = (row.row_id, row.input)
            if p in self._conflict_at:
                self._conflict_rows[p] = {"row_id": row.row_id, "input_id": row.input_id, "input": row.input,
                                          "split": row.split, "label": row.label,
                                          "reference_label": row.reference_label}

    # -- reports ---------------------------------------------------------------------------------------------
    def filter_report(self) -> FilterReport:
        report = FilterReport(rows=self.n, passed=int((self.mask == 0).sum()), clusters=self.n_clusters)
        label_name = {code: name for name, code in self._labels.items()}
        found = []
        for code in CODES:
            rows = np.flatnonzero(self.mask & _BIT[code])
            if len(rows):
                found.append((int(rows[0]), code, rows))
        for _, code, rows in sorted(found, key=lambda f: (f[0], f[1])):  # first row, then code order in a row
            report.reasons[code] = len(rows)
            labels, first, counts = np.unique(self.label[rows], return_index=True, return_counts=True)
            by_label = report.reasons_by_label.setdefault(code, {})
            for k in np.argsort(first, kind="stable").tolist():
                name = label_name[int(labels[k])] or "<none>"  # None and "" are both "<none>"
                by_label[name] = by_label.get(name, 0) + int(counts[k])
        report.timings_s = dict(self.timings)
        return report

    def leakage_report(self) -> LeakageReport:
        report = LeakageReport(threshold=self.config.dedup.threshold, checked=len(self.protected))
        for at, sim, ref in zip(self.leak_at.tolist(), self.leak_sim.tolist(), self.leak_ref.tolist(), strict=True):
            row_id, text = self._leak_rows.get(at, ("", ""))
            ref_id, ref_text = self._leak_rows.get(ref, ("", ""))
            report.hits.append(LeakHit(row_id=row_id, split=SPLIT_NAMES[self.split[at]], input=text,
                                       neighbour_row_id=ref_id, neighbour_input=ref_text,
                                       similarity=round(sim, 4)))
        rows = [self._conflict_rows[p] for p in sorted(self._conflict_rows)]
        for name in ("label", "reference_label"):
            report.conflicts.extend(label_conflicts(rows, name))
        return report

    def close(self) -> None:
        """Remove the spill (idempotent; ``plan`` does it when it finishes)."""
        spill = getattr(self, "spill", None)
        if spill is not None:
            spill.close()


_SORTED = sorted(CODES)


def _clock() -> npt.NDArray[np.float64]:
    return np.array([time.perf_counter(), time.process_time()])
