"""What each page shows, read from the working copy through the data review module (no review logic here)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from distillgate.data import review
from distillgate.data.filters import describe
from distillgate.data.schema import Row
from distillgate.data.store import WorkingCopy
from distillgate.data.versions import HEAD, diff_rows, open_version

QUEUE_HELP = {
    "low_confidence": "the teacher's top label probability is low",
    "long_outputs": "the teacher's answer is unusually long",
    "rare_labels": "labels with only a few rows",
    "failed_parse": "the answer did not parse (INVALID_JSON / SCHEMA_MISMATCH)",
    "disagreement": "the teacher's samples for the input disagree",
    "low_grade": "the rubric grade of the answer is low",
    "priority": "low-graded or disagreeing rows, worst first",
}


@dataclass(frozen=True)
class QueueLine:
    name: str
    todo: int
    total: int
    help: str

    @property
    def done(self) -> int:
        return self.total - self.todo

    @property
    def percent(self) -> int:
        return round(100 * self.done / self.total) if self.total else 100


@dataclass
class Overview:
    name: str
    rows: int
    queues: list[QueueLine]
    review_states: dict[str, int]
    labels: list[tuple[str, int]]
    reasons: list[tuple[str, str, int]]
    edits: dict[str, dict[str, int]]
    head: str | None
    diff_counts: dict[str, int] = field(default_factory=dict)
    diff_sample: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_label(self) -> int:
        return max((n for _, n in self.labels), default=1)


def overview(wc: WorkingCopy, *, max_labels: int = 40) -> Overview:
    rows = wc.rows()
    todo = review.queue_sizes(wc, rows=rows)
    total = review.queue_sizes(wc, include_done=True, rows=rows)
    queues = [QueueLine(name, todo.get(name, 0), n, _queue_help(name)) for name, n in total.items()]
    queues.sort(key=lambda q: (q.name.startswith("reason:"), -q.todo, q.name))
    labels = Counter(r.label or "<none>" for r in rows if r.review_state != "rejected")
    reasons = Counter(code for r in rows for code in r.filter_reasons)
    edits: dict[str, dict[str, int]] = {}
    for r in rows:
        if r.reviewer:
            per = edits.setdefault(r.reviewer, {"accepted": 0, "corrected": 0, "rejected": 0})
            per[r.review_state] = per.get(r.review_state, 0) + 1
    result = Overview(
        name=wc.config.name, rows=len(rows), queues=queues,
        review_states=dict(Counter(r.review_state for r in rows)),
        labels=labels.most_common(max_labels),
        reasons=[(code, text.split(": ", 1)[1], n)
                 for (code, n), text in zip(reasons.most_common(), describe(c for c, _ in reasons.most_common()),
                                            strict=True)],
        edits=dict(sorted(edits.items())),
        head=None,
    )
    head_file = wc.root / HEAD
    if head_file.exists():
        version = open_version(wc.root)
        result.head = version.version_id
        changes = diff_rows(version.rows, rows)
        counts: Counter[str] = Counter()
        for change in changes:
            if change.kind != "changed":
                counts[change.kind] += 1
            counts.update(change.causes)
        result.diff_counts = dict(counts.most_common())
        result.diff_sample = [{"row_id": c.row_id, "kind": c.kind, "causes": c.causes, "fields": c.fields}
                              for c in changes[:25]]
    return result


def _queue_help(name: str) -> str:
    if name.startswith("reason:"):
        _, code, label = name.split(":", 2)
        return f"failed filter {code}, label {label}"
    return QUEUE_HELP.get(name, "")


@dataclass
class RowView:
    row: Row
    samples: list[Row]
    near_duplicates: list[Row]
    reasons: list[tuple[str, str]]
    probs: list[tuple[str, float]]
    allowed_labels: list[str] | None
    known_labels: list[str]
    lease: review.Lease | None
    schema: dict[str, Any] | None = None  # the task's json_schema: the row is corrected in the JSON editor

    @property
    def structured(self) -> bool:
        return self.schema is not None

    @property
    def answer_text(self) -> str:
        """The current answer for the JSON editor: pretty-printed when it is JSON, else as it stands."""
        return pretty_json(self.row.output or self.row.output_raw or "")

    @property
    def schema_text(self) -> str:
        return orjson.dumps(self.schema, option=orjson.OPT_INDENT_2).decode() if self.schema is not None else ""

    @property
    def confidence(self) -> float | None:
        return self.probs[0][1] if self.probs else None


def row_view(wc: WorkingCopy, row_id: str, *, max_dups: int = 8) -> RowView:
    row = review.show(wc, row_id)
    samples = sorted(wc.rows_where("input_id", row.input_id), key=lambda r: r.sample_index)
    dups: dict[str, Row] = {}
    candidates = [*(wc.rows_where("dup_cluster", row.dup_cluster) if row.dup_cluster else []),
                  *wc.rows_where("exact_dup_of", row.input_id),
                  *(wc.rows_where("input_id", row.exact_dup_of) if row.exact_dup_of else [])]
    for r in candidates:
        if r.input_id != row.input_id and r.sample_index == 0:
            dups.setdefault(r.row_id, r)
    probs = sorted((row.label_probs or {}).items(), key=lambda kv: -kv[1])[:5]
    allowed = review.allowed_labels(wc, row.task)
    return RowView(
        row=row,
        samples=samples,
        near_duplicates=list(dups.values())[:max_dups],
        reasons=[(code, text.split(": ", 1)[1]) for code, text in zip(row.filter_reasons,
                                                                      describe(row.filter_reasons), strict=True)],
        probs=probs,
        allowed_labels=allowed,
        known_labels=wc.labels() if allowed is None else [],
        lease=review.lease_of(wc, row_id),
        schema=review.answer_schema(wc, row.task),
    )


def pretty_json(text: str) -> str:
    """``text`` indented two spaces per level (keys kept in order) when it is JSON; unchanged when it is not."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
