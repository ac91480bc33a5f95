"""Read traffic (CSV, JSONL, Parquet) into input rows, using the configured column mapping.

Each record becomes a ``Row`` template with its source (file, record id, group, timestamp) and an input hash;
``input_id`` is ``{file stem}-{record id}`` so re-ingesting the same file is idempotent. When the mapping names an
``output`` column, the rows already carry a teacher answer (an imported generation).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from distillgate.data.config import ColumnMapping, IngestConfig
from distillgate.data.schema import Row, make_row_id, text_sha256
from distillgate.errors import NotFoundError, UserError
from distillgate.jsonl import iter_objects

FORMATS = ("csv", "jsonl", "parquet")


def detect_format(path: Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise UserError(f"unknown traffic format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson"):
        return "jsonl"
    if suffix in ("csv", "parquet"):
        return suffix
    raise UserError(f"cannot tell the format of {path} from its suffix", hint="pass --format csv|jsonl|parquet")


def read_records(path: str | Path, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield each record of a CSV/JSONL/Parquet file as a dict."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"traffic file {p} does not exist", hint="check the path")
    kind = detect_format(p, fmt)
    if kind == "csv":
        with p.open(newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)
    elif kind == "jsonl":
        yield from iter_objects(p)
    else:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=65536):
            yield from batch.to_pylist()


@dataclass(frozen=True)
class IngestResult:
    rows: list[Row]
    skipped_empty: int
    source_file: str


def _get(record: dict[str, Any], column: str | None, path: Path, lineno: int) -> Any:
    if column is None:
        return None
    if column not in record:
        raise UserError(
            f"{path}: record {lineno} has no column {column!r} (columns: {', '.join(sorted(record))})",
            hint="fix ingest.columns in the dataset config or pass --map FIELD=COLUMN",
        )
    return record[column]


def _opt_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def ingest_file(path: str | Path, config: IngestConfig | None = None) -> IngestResult:
    """Read one traffic file into rows (sample 0). Empty inputs are skipped and counted."""
    cfg = config or IngestConfig()
    cols: ColumnMapping = cfg.columns
    p = Path(path)
    stem = p.stem
    rows: list[Row] = []
    skipped = 0
    seen: set[str] = set()
    for n, record in enumerate(read_records(p, cfg.format)):
        text = _get(record, cols.input, p, n)
        if text is None or not str(text).strip():
            skipped += 1
            continue
        text = str(text).strip()
        record_id = str(_get(record, cols.record_id, p, n)) if cols.record_id else str(n)
        input_id = f"{stem}-{record_id}"
        if input_id in seen:
            raise UserError(
                f"{p}: record id {record_id!r} appears twice (column {cols.record_id!r})",
                hint="map record_id to a column with unique values, or leave it unset to use row numbers",
            )
        seen.add(input_id)
        tags_value = _get(record, cols.tags, p, n)
        if isinstance(tags_value, list):
            tags = [str(t) for t in tags_value]
        else:
            tags = [t.strip() for t in str(tags_value or "").split(",") if t.strip()]
        output = _opt_str(_get(record, cols.output, p, n))
        rows.append(
            Row(
                row_id=make_row_id(input_id, 0),
                input_id=input_id,
                input=text,
                task=_opt_str(_get(record, cols.task, p, n)) or cfg.task,
                output_raw=output,
                teacher_model=(_opt_str(_get(record, cols.teacher_model, p, n)) or "imported") if output else None,
                source_file=p.name,
                source_record_id=record_id,
                source_group=_opt_str(_get(record, cols.group, p, n)),
                source_timestamp=_opt_str(_get(record, cols.timestamp, p, n)),
                reference_label=_opt_str(_get(record, cols.reference_label, p, n)),
                tags=tags,
                input_sha256=text_sha256(text),
            )
        )
    return IngestResult(rows=rows, skipped_empty=skipped, source_file=p.name)
