"""Review queues and operations. Plain functions over a working copy and a reviewer identity.

The CLI (``distillgate review ...``) and the web pages call the same functions. Every write names the row version
the reviewer saw (``expected_version``); if the row changed since, ``ConflictError`` is raised and nothing is
written. A correction keeps the teacher's answer, stores the human label as the row's ``label``, and sets
``edited=True`` with the reviewer, reason and a before/after record.

Queues (slices of the working copy):

    low_confidence        teacher top label probability below review.low_confidence_max_prob
    long_outputs          normalised answer longer than review.long_output_chars
    rare_labels           labels with at most review.rare_label_max_count rows
    failed_parse          answers that did not parse (INVALID_JSON / SCHEMA_MISMATCH)
    disagreement          the k teacher samples did not all agree
    reason:CODE:LABEL     rows failed with reason CODE whose label is LABEL (filter reason x label)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from distillgate.data.config import ReviewConfig
from distillgate.data.schema import Row
from distillgate.data.store import WorkingCopy
from distillgate.errors import DatasetGuardError, NotFoundError, UserError

FIXED_QUEUES = ("low_confidence", "long_outputs", "rare_labels", "failed_parse", "disagreement")


def _queue_predicates(rows: list[Row], cfg: ReviewConfig) -> dict[str, Callable[[Row], bool]]:
    counts = Counter(r.label for r in rows if r.label is not None)
    return {
        "low_confidence": lambda r: bool(r.label_probs)
        and max((r.label_probs or {}).values()) < cfg.low_confidence_max_prob,
        "long_outputs": lambda r: len(r.output or "") > cfg.long_output_chars,
        "rare_labels": lambda r: r.label is not None and counts[r.label] <= cfg.rare_label_max_count,
        "failed_parse": lambda r: "INVALID_JSON" in r.filter_reasons or "SCHEMA_MISMATCH" in r.filter_reasons,
        "disagreement": lambda r: r.agreement is not None and r.agreement < 1.0,
    }


def queue_sizes(wc: WorkingCopy, *, include_done: bool = False) -> dict[str, int]:
    """Every non-empty queue with its number of rows still to review (or all rows, with ``include_done``)."""
    rows = wc.rows()
    preds = _queue_predicates(rows, wc.config.review)
    todo = rows if include_done else [r for r in rows if r.review_state == "unreviewed"]
    sizes = {name: sum(1 for r in todo if pred(r)) for name, pred in preds.items()}
    for row in todo:
        for code in row.filter_reasons:
            key = f"reason:{code}:{row.label or '<none>'}"
            sizes[key] = sizes.get(key, 0) + 1
    return {k: v for k, v in sizes.items() if v}


def queue_rows(wc: WorkingCopy, queue: str, *, include_done: bool = False) -> list[Row]:
    rows = wc.rows()
    preds = _queue_predicates(rows, wc.config.review)
    if queue in preds:
        pred = preds[queue]
    elif queue.startswith("reason:") and queue.count(":") >= 2:
        _, code, label = queue.split(":", 2)
        def pred(r: Row) -> bool:
            return code in r.filter_reasons and (r.label or "<none>") == label
    else:
        raise NotFoundError(
            f"no review queue {queue!r}",
            hint=f"use one of {', '.join(FIXED_QUEUES)} or reason:CODE:LABEL (see `distillgate review queues`)",
        )
    return [r for r in rows if pred(r) and (include_done or r.review_state == "unreviewed")]


def next_row(wc: WorkingCopy, queue: str, reviewer: str) -> Row | None:
    """The next unreviewed row of ``queue`` (None when the queue is empty)."""
    _check_reviewer(reviewer)
    rows = queue_rows(wc, queue)
    return rows[0] if rows else None


def show(wc: WorkingCopy, row_id: str) -> Row:
    return wc.get(row_id)


def _check_reviewer(reviewer: str) -> None:
    if not reviewer or not reviewer.strip():
        raise UserError("a review needs the reviewer's identity", hint="pass --reviewer NAME or set $DISTILLGATE_REVIEWER")


def _check_not_locked(wc: WorkingCopy, row: Row) -> None:
    lock = wc.get_meta("golden_lock") or {}
    if row.row_id in lock:
        raise DatasetGuardError(
            f"row {row.row_id!r} is in the hash-locked golden set; it cannot be reviewed or changed",
            hint="golden rows are frozen with the first version; review a copy in a new dataset if it is wrong",
        )


def _snapshot(row: Row) -> dict[str, Any]:
    return {"label": row.label, "review_state": row.review_state, "filter_status": row.filter_status}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Verdict:
    row: Row
    action: str


def _apply(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, action: str,
           label: str | None, reason: str | None) -> Verdict:
    _check_reviewer(reviewer)
    row = wc.get(row_id)
    _check_not_locked(wc, row)
    before = _snapshot(row)
    if action == "accept":
        row.review_state = "accepted"
        row.edited = False
        row.label = row.teacher_label
        if row.label is None:
            raise UserError(
                f"row {row_id!r} has no teacher label to accept",
                hint="use `correct` with --label, or `reject`",
            )
    elif action == "correct":
        if not label or not label.strip():
            raise UserError("a correction needs the new label", hint="pass --label LABEL")
        if not reason or not reason.strip():
            raise UserError("a correction needs a reason", hint="pass --reason TEXT")
        row.review_state = "corrected"
        row.edited = True
        row.label = label.strip()
    else:
        if not reason or not reason.strip():
            raise UserError("a rejection needs a reason", hint="pass --reason TEXT")
        row.review_state = "rejected"
        row.filter_status = "fail"
        row.filter_reasons = sorted({*row.filter_reasons, "REVIEW_REJECTED"})
        row.split, row.split_reason = "excluded", "rejected"
    row.reviewer = reviewer.strip()
    row.review_reason = reason
    row.reviewed_at = _now()
    row.review_before = before
    row.review_after = _snapshot(row)
    return Verdict(wc.update_row(row, expected_version), action)


def accept(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, reason: str | None = None) -> Verdict:
    """Keep the teacher's label. Overrides answer-level filter reasons at the next build."""
    return _apply(wc, row_id, reviewer, expected_version, "accept", None, reason)


def correct(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, label: str, reason: str) -> Verdict:
    """Store the human label as the row's label (the teacher's answer is kept); marks ``edited=True``."""
    return _apply(wc, row_id, reviewer, expected_version, "correct", label, reason)


def reject(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, reason: str) -> Verdict:
    """Drop the row from every split (reason code REVIEW_REJECTED)."""
    return _apply(wc, row_id, reviewer, expected_version, "reject", None, reason)
