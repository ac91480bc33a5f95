"""The streaming build gives every row the verdicts, and the reports, of the in-memory build it replaced.

The oracle is tests/_build_reference.py (the row-at-a-time build as it was before it streamed). Rows: a few thousand
real banking77 inputs with what makes the dataset-wide steps non-trivial — k samples that disagree, exact and near
duplicates (also across batches), source groups, timestamps, tasks with their own filters, reviews, adversarial
tags, low-confidence answers, refusals, eval-set and golden contamination, and a planted leak.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from _build_reference import reference_process
from _data_support import BANKING_LABELS, BANKING_TEST, banking_rows
from distillgate.data.config import DatasetConfig, parse_config
from distillgate.data.pipeline import BuildReport, build, process, process_stream
from distillgate.data.schema import Row
from distillgate.data.store import WorkingCopy

LABELS = json.loads(BANKING_LABELS.read_text())


def _answer(label: str, note: str = "") -> str:
    return json.dumps({"type": label, "explanation": "The customer asks about " + label.replace("_", " ") + note})


def corpus(n_inputs: int = 3000, seed: int = 7) -> list[Row]:
    rng = random.Random(seed)
    base = banking_rows(limit=n_inputs)
    rows: list[Row] = []
    texts: list[str] = []
    for i, record in enumerate(base):
        text, label = record["text"], record["category"]
        roll = rng.random()
        if i > 50 and roll < 0.04:
            text = texts[rng.randrange(i)].upper()  # exact duplicate of an earlier input
        elif i > 50 and roll < 0.08:
            text = texts[rng.randrange(i)] + " " + rng.choice(["please", "thanks", "asap", "today"])
        texts.append(text)
        k = 3 if i % 7 == 0 else 1
        for s in range(k):
            sample_label = label if s == 0 or rng.random() < 0.5 else rng.choice(LABELS)
            raw = _answer(sample_label)
            if i % 97 == 3:
                raw = "sorry, I cannot parse that"  # invalid JSON / plain text
            elif i % 89 == 5:
                raw = _answer("refusal")
            row = Row(row_id=f"b-{i}:{s}", input_id=f"b-{i}", input=text, output_raw=raw, sample_index=s,
                      task="intent" if i % 5 == 0 else "default",
                      source_group=f"acct-{i % 401}" if i % 3 == 0 else ("" if i % 11 == 0 else None),
                      source_timestamp=f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T00:00:00Z",
                      tags=["adversarial"] if i % 131 == 0 else [])
            if i % 53 == 0:
                row.label_probs = {sample_label: 0.3, "other": 0.25}
            if i % 61 == 0:
                row.review_state, row.reviewer = "rejected", "ann"
            elif i % 67 == 0:
                row.review_state, row.reviewer = "accepted", "ann"
            elif i % 71 == 0:
                row.review_state, row.edited = "corrected", True
                row.review_after = {"label": "card_arrival"}
            rows.append(row)
    rng.shuffle(rows)  # samples of one input far apart, as generation appends them
    return rows


def config(**split: Any) -> DatasetConfig:
    return parse_config({
        "filters": {"valid_json": True, "allowed_labels_file": str(BANKING_LABELS),
                    "disagreement": {"min_agreement": 0.7}},
        "tasks": {"intent": {"filters": {"valid_json": True, "near_duplicates": False, "decontaminate": False,
                                         "length": {"min_chars": 30, "max_chars": 4000}}}},
        "split": {"seed": 3, **split},
    })


def eval_texts() -> list[str]:
    test = [r["text"] for r in banking_rows(BANKING_TEST, limit=400)]
    return [*test, banking_rows(limit=40)[17]["text"] + " please"]


def _comparable(report: BuildReport) -> dict[str, Any]:
    filters = dict(vars(report.filters))
    filters.pop("timings_s")
    return {"filters": filters, "reasons_order": list(report.filters.reasons),
            "by_label_order": {k: list(v) for k, v in report.filters.reasons_by_label.items()},
            "split": vars(report.split), "split_order": list(report.split.counts),
            "holdout_order": list(report.split.holdout_reasons),
            "leakage": (report.leakage.threshold, report.leakage.checked, report.leakage.hits)}


def _batches(rows: Sequence[Row], size: int) -> Iterator[Sequence[Row]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _both(rows: list[Row], cfg: DatasetConfig, *, batch: int = 257, **kw: Any) -> tuple[list[Row], list[Row],
                                                                                         BuildReport, BuildReport]:
    old, new = copy.deepcopy(rows), copy.deepcopy(rows)
    want = reference_process(old, cfg, **kw)
    got = process_stream(lambda: _batches(new, batch), cfg, **kw)
    return old, new, want, got


def _assert_same(old: list[Row], new: list[Row], want: BuildReport, got: BuildReport) -> None:
    for a, b in zip(old, new, strict=True):
        assert a.to_record() == b.to_record(), a.row_id
    assert _comparable(got) == _comparable(want)


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return corpus()


def test_same_rows_clusters_and_splits_as_the_in_memory_build(rows):
    old, new, want, got = _both(rows, config(), eval_texts=eval_texts())
    _assert_same(old, new, want, got)
    # the corpus exercises what it claims to
    reasons = want.filters.reasons
    for code in ("EXACT_DUPLICATE", "NEAR_DUPLICATE", "SAMPLE_DISAGREEMENT", "CONTAMINATED", "REVIEW_REJECTED",
                 "INVALID_JSON", "TOO_SHORT"):
        assert reasons.get(code, 0) > 0, code
    assert len({r.split for r in old}) == 6
    assert set(want.split.holdout_reasons) >= {"rare_label", "cannot_answer", "adversarial", "ambiguous"}
    assert want.filters.clusters < len({r.input_id for r in old})


def test_same_with_a_golden_lock_and_a_planted_leak(rows):
    first = copy.deepcopy(rows)
    process(first, config())
    golden = [r for r in first if r.split == "golden"][:40]
    lock = {r.row_id: r.golden_sha256() for r in golden}
    trained = next(r for r in first if r.split == "train")
    leaky = copy.deepcopy(rows)
    # a test-worthy twin of a trained input, in its own group and far from it
    twin = Row(row_id="leak:0", input_id="leak", input=trained.input + " now", output_raw=_answer("card_arrival"))
    leaky.append(twin)
    old, new, want, got = _both(leaky, config(holdout={"enabled": False}), golden_lock=lock, eval_texts=["hello"])
    _assert_same(old, new, want, got)
    assert {r.split_reason for r in old} >= {"locked", "golden_group"} or {r.split_reason for r in old} >= {"locked"}
    assert "CONTAMINATED" in want.filters.reasons  # inputs near the locked golden rows


def test_same_by_time_with_an_ids_file_and_three_gram_dedup(rows, tmp_path: Path):
    ids = tmp_path / "golden.txt"
    ids.write_text("\n".join(f"b-{i}" for i in range(0, 3000, 37)) + "\n")
    cfg = config(by_time=True, golden={"ids_file": str(ids)}, ratios={"train": 0.7, "test": 0.3})
    cfg = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"ngram": 3, "threshold": 0.7})})
    old, new, want, got = _both(rows, cfg, batch=4096)
    _assert_same(old, new, want, got)
    assert "ids_file" in {r.split_reason for r in old}


def test_batch_size_does_not_change_the_build(rows):
    small = copy.deepcopy(rows[:1500])  # duplicates and samples of one input land in different batches
    large = copy.deepcopy(rows[:1500])
    a = process_stream(lambda: _batches(small, 5), config())
    b = process_stream(lambda: _batches(large, 100_000), config())
    _assert_same(small, large, a, b)


def test_working_copy_build_streams_and_saves_the_same_rows(rows, tmp_path: Path):
    cfg = config()
    sample = copy.deepcopy(rows[:1500])
    wc = WorkingCopy.create(tmp_path / "ds", cfg.model_dump(exclude_defaults=True))
    with wc.transaction() as conn:
        for row in sample:
            wc._insert_row(conn, row)
    report = build(wc)
    stored = {r.row_id: r for r in wc.rows()}
    expected = copy.deepcopy(sample)
    want = reference_process(expected, cfg)
    for row in expected:
        got = stored[row.row_id]
        assert got.version == 2
        got.version = row.version
        assert got.to_record() == row.to_record()
    assert report.changed == len(sample) and report.conflicts == []
    assert _comparable(report) == _comparable(want)
    assert build(wc).changed == 0  # a second build changes nothing
    wc.close()


def test_process_keeps_its_in_place_contract(rows):
    mine = copy.deepcopy(rows[:500])
    report = process(mine, config())
    assert all(r.split is not None and r.filter_status in ("pass", "fail") for r in mine)
    assert report.filters.rows == 500


class _ChangedBetweenPasses(WorkingCopy):
    """A working copy whose rows are changed by another writer (its own connection) right after the first pass."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.calls = 0
        self.meanwhile: Any = None

    def iter_row_pages(self, size: int) -> Iterator[tuple[list[int], list[Row]]]:
        self.calls += 1
        yield from super().iter_row_pages(size)
        if self.calls == 1 and self.meanwhile is not None:
            with WorkingCopy.open(self.root) as other:
                self.meanwhile(other)


def _working_copy(tmp_path: Path, rows: list[Row], cls: type[WorkingCopy] = WorkingCopy) -> WorkingCopy:
    cfg = config()
    WorkingCopy.create(tmp_path / "ds", cfg.model_dump(exclude_defaults=True)).close()
    wc = cls.open(tmp_path / "ds")
    with wc.transaction() as conn:
        for row in copy.deepcopy(rows):
            wc._insert_row(conn, row)
    return wc


def test_a_row_changed_or_added_between_the_passes_is_left_alone(rows, tmp_path: Path):
    wc = _working_copy(tmp_path, rows[:300], _ChangedBetweenPasses)
    victim = wc.rows()[10]

    def meanwhile(other: WorkingCopy) -> None:
        row = other.get(victim.row_id)
        row.review_state, row.reviewer = "rejected", "bob"
        other.update_row(row, row.version)
        with other.transaction() as conn:
            other._insert_row(conn, Row(row_id="late:0", input_id="late", input="a late row", output_raw="{}"))

    wc.meanwhile = meanwhile  # type: ignore[attr-defined]
    report = build(wc)
    assert report.conflicts == [victim.row_id]
    kept = wc.get(victim.row_id)
    assert kept.version == 2 and kept.reviewer == "bob" and kept.split is None  # the reviewer's write stands
    late = wc.get("late:0")
    assert late.version == 1 and late.split is None  # not built: the next build sees it
    assert report.filters.rows == 300 and report.changed == 299
    wc.close()


class _FailsMidWrite(WorkingCopy):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.writes = 0

    def update_row(self, row: Row, expected_version: int) -> Row:
        self.writes += 1
        if self.writes == 120:
            raise OSError("disk full (simulated at the 120th write)")
        return super().update_row(row, expected_version)


def test_a_build_that_fails_mid_write_changes_nothing_and_leaves_no_spill(rows, tmp_path: Path, monkeypatch):
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spill_root))
    wc = _working_copy(tmp_path, rows[:300], _FailsMidWrite)
    with pytest.raises(OSError, match="disk full"):
        build(wc)
    assert {r.version for r in wc.rows()} == {1} and {r.split for r in wc.rows()} == {None}  # rolled back whole
    assert list(spill_root.iterdir()) == []
    wc.writes = -10**9  # type: ignore[attr-defined]
    assert build(wc).changed == 300
    assert list(spill_root.iterdir()) == []
    wc.close()


def test_edge_sets_match_too(rows):
    # every row fails its filters: nothing is split, nothing leaks
    failing = copy.deepcopy(rows[:200])
    for row in failing:
        row.output_raw = "not json"
    _assert_same(*_both(failing, config()))
    # one row; and rows whose inputs are all one text
    _assert_same(*_both(copy.deepcopy(rows[:1]), config()))
    same = copy.deepcopy(rows[:50])
    for row in same:
        row.input = "how do i top up my card"
    _assert_same(*_both(same, config()))


def test_by_time_without_timestamps_fails_like_before(rows):
    from distillgate.errors import UserError

    missing = copy.deepcopy(rows[:100])
    missing[40].source_timestamp = None
    with pytest.raises(UserError, match="some rows have no timestamp"):
        reference_process(copy.deepcopy(missing), config(by_time=True, holdout={"enabled": False}))
    with pytest.raises(UserError, match="some rows have no timestamp"):
        process(missing, config(by_time=True, holdout={"enabled": False}))
