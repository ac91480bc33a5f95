"""The dataset row: one typed record per (input, teacher sample), with a versioned JSON/Parquet schema.

``Row`` holds everything a researcher needs to explain a training example six months later: the input and where it
came from, the teacher's raw and normalised answer with the teacher card, prompt template and sampling settings,
the gateway's signed provenance stamp, the filter verdict with reason codes, the near-duplicate cluster, the split
and the review trail.

Serialised form (``Row.to_record``): a flat dict whose nested values (``label_probs``, ``top_logprobs``,
``teacher_card``, ``sampling``, ``stamp``, ``grading``, ``review_before``, ``review_after``) stay dicts/lists in JSON
and are stored as JSON text columns in Parquet (``ARROW_SCHEMA``). ``SCHEMA_VERSION`` changes whenever a field
changes (2: ``trace``, the teacher's reasoning trace apart from its answer; ``grade`` and ``grading``, the rubric
grade of the answer).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from distillgate.errors import UserError

SCHEMA_VERSION = 2

SPLITS = ("train", "val", "test", "golden", "holdout", "excluded")
FILTER_STATUSES = ("pending", "pass", "fail")
REVIEW_STATES = ("unreviewed", "accepted", "corrected", "rejected")

# Fields stored as JSON text in Parquet (dicts / nested lists in Python).
JSON_FIELDS = ("label_probs", "top_logprobs", "teacher_card", "sampling", "stamp", "grading", "review_before",
               "review_after")


@dataclass(slots=True)
class Row:
    """One dataset row. ``row_id`` is ``{input_id}:{sample_index}``; ``version`` counts edits (optimistic locking)."""

    row_id: str
    input_id: str
    input: str
    task: str = "default"
    sample_index: int = 0
    # teacher answer
    output_raw: str | None = None  # None: not generated yet
    output: str | None = None  # normalised answer
    teacher_label: str | None = None  # label read from the normalised answer (or argmax of label_probs)
    label: str | None = None  # final label: the human correction when edited, else the teacher's
    label_probs: dict[str, float] | None = None
    top_logprobs: list[list[dict[str, Any]]] | None = None
    trace: str | None = None  # the teacher's reasoning trace, kept apart from the answer (distillgate.traces)
    teacher_model: str | None = None
    teacher_card: dict[str, Any] | None = None
    prompt_template_id: str | None = None
    prompt_template_sha256: str | None = None
    sampling: dict[str, Any] | None = None
    stamp: dict[str, Any] | None = None
    # source
    source_file: str = ""
    source_record_id: str = ""
    source_group: str | None = None
    source_timestamp: str | None = None
    reference_label: str | None = None  # a label that came with the traffic (not used for training)
    tags: list[str] = field(default_factory=list)
    input_sha256: str = ""
    # pipeline verdicts
    filter_status: str = "pending"
    filter_reasons: list[str] = field(default_factory=list)
    exact_dup_of: str | None = None
    dup_cluster: str | None = None
    agreement: float | None = None
    grade: float | None = None  # the rubric grade of the answer, on the rubric's scale (distillgate.data.grade)
    grading: dict[str, Any] | None = None  # rubric id and sha256, grader model, per-criterion scores, raw, stamp
    split: str | None = None
    split_reason: str | None = None  # why a row is in holdout/golden/excluded (e.g. "rare_label", "locked")
    # review
    review_state: str = "unreviewed"
    edited: bool = False
    reviewer: str | None = None
    review_reason: str | None = None
    review_before: dict[str, Any] | None = None
    review_after: dict[str, Any] | None = None
    reviewed_at: str | None = None
    version: int = 1

    def to_record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in _FIELDS}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Row:
        unknown = set(record) - _FIELD_NAMES
        if unknown:
            raise UserError(
                f"row record has unknown field(s) {sorted(unknown)} (schema version {SCHEMA_VERSION})",
                hint="the data was written by a newer distillgate, or is not a distillgate dataset",
            )
        values = dict(record)
        for name in ("tags", "filter_reasons"):
            if values.get(name) is None:
                values[name] = []
        return cls(**values)

    def content_sha256(self) -> str:
        """Hash of the row's content (everything but the edit counter ``version``)."""
        record = self.to_record()
        record.pop("version")
        return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def golden_sha256(self) -> str:
        """Hash of what a golden row must never change: input, final label and normalised answer."""
        payload = {"row_id": self.row_id, "input": self.input, "label": self.label, "output": self.output}
        return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


_FIELDS = dataclasses.fields(Row)
_FIELD_NAMES = frozenset(f.name for f in _FIELDS)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in _FIELDS)


def make_row_id(input_id: str, sample_index: int) -> str:
    return f"{input_id}:{sample_index}"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_ARROW_TYPES: dict[str, pa.DataType] = {
    "sample_index": pa.int32(),
    "tags": pa.list_(pa.string()),
    "filter_reasons": pa.list_(pa.string()),
    "agreement": pa.float64(),
    "grade": pa.float64(),
    "edited": pa.bool_(),
    "version": pa.int64(),
}

ARROW_SCHEMA = pa.schema(
    [pa.field(name, _ARROW_TYPES.get(name, pa.string())) for name in FIELD_NAMES],
    metadata={b"distillgate.schema_version": str(SCHEMA_VERSION).encode()},
)


def rows_to_table(rows: Sequence[Row]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in FIELD_NAMES}
    for row in rows:
        for name in FIELD_NAMES:
            value = getattr(row, name)
            if name in JSON_FIELDS and value is not None:
                value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
            columns[name].append(value)
    return pa.table(columns, schema=ARROW_SCHEMA)


def table_to_records(table: pa.Table, *, decode_json: bool = True) -> list[dict[str, Any]]:
    version = (table.schema.metadata or {}).get(b"distillgate.schema_version")
    if version is not None and int(version) != SCHEMA_VERSION:
        raise UserError(
            f"dataset schema version {int(version)} is not supported (this distillgate reads {SCHEMA_VERSION})",
            hint="use the distillgate release that wrote the dataset, or re-freeze it with this one",
        )
    records: list[dict[str, Any]] = table.to_pylist()
    if decode_json:
        for record in records:
            for name in JSON_FIELDS:
                value = record.get(name)
                if isinstance(value, str):
                    record[name] = orjson.loads(value)
    return records


def write_parquet(rows: Sequence[Row], path: Path) -> None:
    pq.write_table(rows_to_table(rows), path, compression="zstd")


def read_parquet(path: Path) -> list[Row]:
    return [Row.from_record(r) for r in table_to_records(pq.read_table(path))]


def rows_sha256(rows: Iterable[Row]) -> str:
    """Order-independent content hash of a row set (rows sorted by ``row_id``)."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.row_id):
        digest.update(row.row_id.encode())
        digest.update(b"\0")
        digest.update(row.content_sha256().encode())
        digest.update(b"\n")
    return digest.hexdigest()
