"""Review queues and operations. Plain functions over a working copy and a reviewer identity.

The CLI (``distillgate review ...``) and the web pages call the same functions. Every write names the row version
the reviewer saw (``expected_version``); if the row changed since, ``ConflictError`` is raised and nothing is
written. A correction keeps the teacher's answer, stores the human label as the row's ``label``, and sets
``edited=True`` with the reviewer, reason and a before/after record.

Structured tasks (the task's filters set ``json_schema``) are corrected with a whole answer instead of a label:
``correct_answer`` parses the reviewer's JSON, puts it through the same normalisation as teacher answers, checks it
against the task's schema with the schema filter's own validator, and stores it as the row's ``output`` (the label
is the one it names). ``output_raw`` keeps the teacher's answer; ``review_before`` / ``review_after`` then also hold
``output``, and the build keeps the human answer (``review_after["output"]``) as it keeps a human label.

Queues (slices of the working copy):

    low_confidence        teacher top label probability below review.low_confidence_max_prob
    long_outputs          normalised answer longer than review.long_output_chars
    rare_labels           labels with at most review.rare_label_max_count rows
    failed_parse          answers that did not parse (INVALID_JSON / SCHEMA_MISMATCH)
    disagreement          the k teacher samples did not all agree
    low_grade             the answer's rubric grade is below review.low_grade_below (``distillgate.data.grade``)
    priority              low-graded or disagreeing rows, worst first: the sum of (1 - agreement) and the grade's
                          shortfall on the rubric scale (0 at the top point, 1 at the bottom) orders them
    reason:CODE:LABEL     rows failed with reason CODE whose label is LABEL (filter reason x label)

Leases: a reviewer working a row holds a lease on it (``claim``; ``claim_next`` takes the next free row of a queue)
that expires after ``LEASE_TTL_S`` seconds unless renewed. While another reviewer's lease is live, ``claim`` and
every write on that row raise ``ConflictError``; a write releases the writer's lease. So two reviewers never work
the same row at once, and a reviewer who walks away frees the row when the lease runs out.

Decision log: ``review_event(verdict, ...)`` is the body of the ``review`` event the caller appends to the decision
log (``Store.append_event("review", ...)``); ``log_review`` does both. The event's ``run`` and ``reviewer`` are what
a run bundle's manifest lists as the run's reviewers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import jsonschema
import orjson

from distillgate.data.config import ReviewConfig
from distillgate.data.filters import compile_filters
from distillgate.data.normalize import normalise_object, normalise_output
from distillgate.data.schema import Row
from distillgate.data.store import WorkingCopy
from distillgate.errors import ConflictError, DatasetGuardError, NotFoundError, UserError

FIXED_QUEUES = ("low_confidence", "long_outputs", "rare_labels", "failed_parse", "disagreement", "low_grade",
                "priority")
LEASE_TTL_S = 300.0

_LEASES = """
CREATE TABLE IF NOT EXISTS review_leases (
    row_id TEXT PRIMARY KEY,
    reviewer TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""


def _queue_predicates(rows: list[Row], cfg: ReviewConfig) -> dict[str, Callable[[Row], bool]]:
    counts = Counter(r.label for r in rows if r.label is not None)
    return {
        "low_confidence": lambda r: bool(r.label_probs)
        and max((r.label_probs or {}).values()) < cfg.low_confidence_max_prob,
        "long_outputs": lambda r: len(r.output or "") > cfg.long_output_chars,
        "rare_labels": lambda r: r.label is not None and counts[r.label] <= cfg.rare_label_max_count,
        "failed_parse": lambda r: "INVALID_JSON" in r.filter_reasons or "SCHEMA_MISMATCH" in r.filter_reasons,
        "disagreement": lambda r: r.agreement is not None and r.agreement < 1.0,
        "low_grade": lambda r: r.grade is not None and r.grade < cfg.low_grade_below,
        "priority": lambda r: (r.agreement is not None and r.agreement < 1.0)
        or (r.grade is not None and r.grade < cfg.low_grade_below),
    }


def priority(row: Row) -> float:
    """How much a row needs a person: samples' disagreement plus the grade's shortfall, each 0 (fine) to 1."""
    disagreement = 1.0 - row.agreement if row.agreement is not None else 0.0
    shortfall = 0.0
    scale = (row.grading or {}).get("scale")
    if row.grade is not None and isinstance(scale, list) and len(scale) == 2 and scale[1] > scale[0]:
        shortfall = (scale[1] - row.grade) / (scale[1] - scale[0])
    return disagreement + shortfall


def queue_sizes(wc: WorkingCopy, *, include_done: bool = False, rows: list[Row] | None = None) -> dict[str, int]:
    """Every non-empty queue with its number of rows still to review (or all rows, with ``include_done``).

    ``rows``: the working copy's rows when the caller has just read them (saves a second read).
    """
    rows = wc.rows() if rows is None else rows
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
    picked = [r for r in rows if pred(r) and (include_done or r.review_state == "unreviewed")]
    if queue == "priority":
        picked.sort(key=lambda r: (-priority(r), r.row_id))
    return picked


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


def _snapshot(row: Row, *, with_output: bool = False) -> dict[str, Any]:
    snap: dict[str, Any] = {"label": row.label, "review_state": row.review_state,
                            "filter_status": row.filter_status}
    if with_output:
        snap["output"] = row.output
    return snap


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Verdict:
    row: Row
    action: str


def _apply(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, action: str,
           label: str | None, reason: str | None, output: str | None = None) -> Verdict:
    """Write one verdict. ``output`` (structured corrections only) is the reviewer's normalised answer."""
    _check_reviewer(reviewer)
    row = wc.get(row_id)
    _check_not_locked(wc, row)
    # an answer a reviewer wrote earlier is part of the trail while it stands, and while it is taken back
    had_output = "output" in (row.review_after or {})
    if had_output and output is None:  # a new verdict without an answer restores the teacher's answer
        current = normalise_output(row.output_raw or "", wc.config.normalise, row.label_probs).output
    else:
        current = row.output or ""
    # A new label for a row whose answer is a JSON object naming a label: the answer names the new one too, or
    # training would read the old category from the output (it is part of the trail like a written answer).
    answer = (_answer_label_object(current, wc.config.normalise.label_key)
              if action == "correct" and output is None and label and label.strip() else None)
    with_output = output is not None or had_output or answer is not None
    before = _snapshot(row, with_output=with_output)
    if had_output and output is None:
        row.output = current
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
        if output is None and (not label or not label.strip()):
            raise UserError("a correction needs the new label", hint="pass --label LABEL")
        if not reason or not reason.strip():
            raise UserError("a correction needs a reason", hint="pass --reason TEXT")
        if output is not None:
            row.output = output
            row.label = label
        elif label is not None:
            allowed = allowed_labels(wc, row.task)
            if allowed is not None and label.strip() not in allowed:
                raise UserError(
                    f"label {label.strip()!r} is not an allowed label of task {row.task!r}",
                    hint="pick one of the labels in filters.allowed_labels / allowed_labels_file",
                )
            row.label = label.strip()
            if answer is not None:
                answer[wc.config.normalise.label_key] = row.label
                row.output = orjson.dumps(answer, option=orjson.OPT_SORT_KEYS).decode()
        row.review_state = "corrected"
        row.edited = True
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
    row.review_after = _snapshot(row, with_output=with_output)
    _ensure_leases(wc)
    with wc.transaction():
        _check_lease(wc, row_id, reviewer.strip(), time.time())
        saved = wc.update_row(row, expected_version)
        wc.conn.execute("DELETE FROM review_leases WHERE row_id=?", (row_id,))
    return Verdict(saved, action)


def _answer_label_object(text: str, label_key: str) -> dict[str, Any] | None:
    """The answer as a JSON object when it is one and names a label under ``label_key``; else None."""
    if not text.startswith("{"):
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and isinstance(value.get(label_key), str) else None


def accept(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, reason: str | None = None) -> Verdict:
    """Keep the teacher's label. Overrides answer-level filter reasons at the next build."""
    return _apply(wc, row_id, reviewer, expected_version, "accept", None, reason)


def correct(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, label: str, reason: str) -> Verdict:
    """Store the human label as the row's label (the teacher's answer is kept); marks ``edited=True``."""
    return _apply(wc, row_id, reviewer, expected_version, "correct", label, reason)


def correct_answer(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, answer: str,
                   reason: str) -> Verdict:
    """Store a reviewer's whole answer for a structured task (one whose filters set ``json_schema``).

    ``answer`` is JSON text. It must parse to an object; it is normalised like a teacher answer (key aliases,
    canonical label, trimmed explanation) and must then match the task's schema (checked by the schema filter's
    validator) and, when the task has allowed labels, name one. It becomes the row's ``output`` (sorted-key JSON,
    as every normalised answer) and its label the row's ``label``; the row is marked ``edited``.
    Raises ``UserError`` naming what is wrong (for a schema error: where in the answer, e.g. ``$.amount``).
    """
    row = wc.get(row_id)
    compiled = compile_filters(wc.config.filters_for(row.task), base=wc.root, normalise=wc.config.normalise)
    if compiled.schema_validator is None:
        raise UserError(
            f"task {row.task!r} has no json_schema, so its rows are corrected with a label",
            hint="use `correct` with a label, or set filters.json_schema (tasks.<task>.filters.json_schema)",
        )
    try:
        value = orjson.loads(answer)
    except orjson.JSONDecodeError as exc:
        raise UserError(f"the answer is not valid JSON: {exc}",
                        hint="fix the JSON (double quotes around keys and strings, no trailing commas)") from None
    if not isinstance(value, dict):
        raise UserError(f"the answer must be a JSON object, not {_json_kind(value)}",
                        hint="write the answer as {\"key\": value, ...}")
    fixed, label = normalise_object(value, wc.config.normalise)
    problems = sorted(compiled.schema_validator.iter_errors(fixed), key=lambda e: list(map(str, e.absolute_path)))
    if problems:
        shown = "; ".join(f"at {json_path(e)}: {e.message}" for e in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"the answer does not match the task's schema: {shown}{more}",
                        hint="fix the answer at that place; the schema is filters.json_schema of the dataset")
    if compiled.allowed is not None and label not in compiled.allowed:
        key = wc.config.normalise.label_key
        named = f"label {label!r}" if label is not None else f"no label (key {key!r})"
        raise UserError(f"the answer names {named}, which is not an allowed label of task {row.task!r}",
                        hint=f"set {key!r} to one of the labels in filters.allowed_labels / allowed_labels_file")
    output = orjson.dumps(fixed, option=orjson.OPT_SORT_KEYS).decode()
    return _apply(wc, row_id, reviewer, expected_version, "correct", label, reason, output=output)


def reject(wc: WorkingCopy, row_id: str, reviewer: str, expected_version: int, reason: str) -> Verdict:
    """Drop the row from every split (reason code REVIEW_REJECTED)."""
    return _apply(wc, row_id, reviewer, expected_version, "reject", None, reason)


def json_path(error: jsonschema.ValidationError) -> str:
    """Where in the answer a schema error is, as ``$.items[0].name`` (``$`` for the whole answer)."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def answer_schema(wc: WorkingCopy, task: str) -> dict[str, Any] | None:
    """The JSON schema answers of ``task`` must match (None: the task is not structured)."""
    return wc.config.filters_for(task).json_schema


def allowed_labels(wc: WorkingCopy, task: str) -> list[str] | None:
    """The labels a correction of ``task`` may use (canonicalised, sorted); None when the config names none."""
    compiled = compile_filters(wc.config.filters_for(task), base=wc.root, normalise=wc.config.normalise)
    return sorted(compiled.allowed) if compiled.allowed is not None else None


# -- leases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    row_id: str
    reviewer: str
    expires_at: float  # seconds since the epoch


def _ensure_leases(wc: WorkingCopy) -> None:
    wc.conn.executescript(_LEASES)


def lease_of(wc: WorkingCopy, row_id: str, *, now: float | None = None) -> Lease | None:
    """The live lease on ``row_id`` (None when nobody holds one or it expired)."""
    _ensure_leases(wc)
    found = wc.conn.execute("SELECT reviewer, expires_at FROM review_leases WHERE row_id=?", (row_id,)).fetchone()
    at = time.time() if now is None else now
    if found is None or float(found[1]) <= at:
        return None
    return Lease(row_id, str(found[0]), float(found[1]))


def _check_lease(wc: WorkingCopy, row_id: str, reviewer: str, now: float) -> None:
    found = wc.conn.execute("SELECT reviewer, expires_at FROM review_leases WHERE row_id=?", (row_id,)).fetchone()
    if found is not None and found[0] != reviewer and float(found[1]) > now:
        until = datetime.fromtimestamp(float(found[1]), UTC).isoformat(timespec="seconds")
        raise ConflictError(
            f"row {row_id!r} is being reviewed by {found[0]} (lease until {until})",
            hint="take the next row of the queue; the row frees itself when the lease expires",
        )


def claim(wc: WorkingCopy, row_id: str, reviewer: str, *, ttl_s: float = LEASE_TTL_S,
          now: float | None = None) -> Lease:
    """Take (or renew) the lease on ``row_id`` for ``reviewer``; ConflictError while someone else holds it."""
    _check_reviewer(reviewer)
    wc.get(row_id)  # NotFoundError for unknown rows
    _ensure_leases(wc)
    at = time.time() if now is None else now
    who = reviewer.strip()
    with wc.transaction() as conn:
        _check_lease(wc, row_id, who, at)
        conn.execute(
            "INSERT INTO review_leases(row_id, reviewer, expires_at) VALUES(?, ?, ?) ON CONFLICT(row_id) DO UPDATE"
            " SET reviewer=excluded.reviewer, expires_at=excluded.expires_at",
            (row_id, who, at + ttl_s),
        )
    return Lease(row_id, who, at + ttl_s)


def release(wc: WorkingCopy, row_id: str, reviewer: str) -> bool:
    """Give back ``reviewer``'s lease on ``row_id``; True when there was one."""
    _ensure_leases(wc)
    cur = wc.conn.execute("DELETE FROM review_leases WHERE row_id=? AND reviewer=?", (row_id, reviewer.strip()))
    return bool(cur.rowcount)


def release_all(wc: WorkingCopy, reviewer: str) -> int:
    """Give back every lease ``reviewer`` holds (on sign-out); returns how many."""
    _ensure_leases(wc)
    return int(wc.conn.execute("DELETE FROM review_leases WHERE reviewer=?", (reviewer.strip(),)).rowcount)


def claim_next(wc: WorkingCopy, queue: str, reviewer: str, *, ttl_s: float = LEASE_TTL_S,
               now: float | None = None, skip: frozenset[str] = frozenset()) -> Row | None:
    """Lease and return the next unreviewed row of ``queue`` nobody else is working (rows in ``skip`` last).

    A row this reviewer already holds comes first, so reloading the page does not hand out a second row.
    """
    _check_reviewer(reviewer)
    _ensure_leases(wc)
    at = time.time() if now is None else now
    held = {
        str(r): (str(who), float(exp))
        for r, who, exp in wc.conn.execute("SELECT row_id, reviewer, expires_at FROM review_leases")
        if float(exp) > at
    }
    who = reviewer.strip()
    rows = queue_rows(wc, queue)
    mine = [r for r in rows if held.get(r.row_id, ("", 0.0))[0] == who and r.row_id not in skip]
    free = [r for r in rows if r.row_id not in held and r.row_id not in skip]
    later = [r for r in rows if r.row_id in skip and (r.row_id not in held or held[r.row_id][0] == who)]
    for row in [*mine, *free, *later]:
        try:
            claim(wc, row.row_id, who, ttl_s=ttl_s, now=at)
        except ConflictError:  # someone took it between our read and our claim
            continue
        return row
    return None


# -- decision log ------------------------------------------------------------------------------------------


class EventLog(Protocol):
    """What ``log_review`` needs of the ledger: ``distillgate.ledger.store.Store`` fits."""

    def append_event(self, kind: str, fields: Mapping[str, Any]) -> Any: ...


def review_event(verdict: Verdict, *, dataset: str, project: str | None, run: str | None) -> dict[str, Any]:
    """The body of the ``review`` decision-log event recording ``verdict``."""
    row = verdict.row
    return {
        "reviewer": row.reviewer,
        "user": row.reviewer,
        "row_id": row.row_id,
        "row_version": row.version,
        "action": verdict.action,
        "before": row.review_before,
        "after": row.review_after,
        "reason": row.review_reason,
        "edited": row.edited,
        "reviewed_at": row.reviewed_at,
        "dataset": dataset,
        "project": project,
        "run": run,
    }


def log_review(log: EventLog, verdict: Verdict, *, dataset: str, project: str | None, run: str | None) -> Any:
    """Append the ``review`` event of ``verdict`` to the decision log; returns the log entry."""
    return log.append_event("review", review_event(verdict, dataset=dataset, project=project, run=run))
