"""Export a frozen version to ``file://`` or an approved ``s3://`` destination (through ``distillgate.destinations``).

Formats (all under ``<destination>/<version id16>/``):

    jsonl     rows.jsonl (one row per line, nested fields as JSON) + manifest.json
    parquet   rows.parquet (the frozen file, byte for byte) + manifest.json
    hf        hf/README.md (dataset card with a ``configs`` block) + hf/data/<split>-00000-of-00001.parquet:
              ``datasets.load_dataset("<dir>/hf")`` loads it with one split per dataset split ("val" is
              exported as "validation"); only rows that passed the filters
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import orjson
import pyarrow.parquet as pq

from distillgate.data.schema import Row, rows_to_table
from distillgate.data.versions import MANIFEST, NOTES, ROWS_FILE, Version
from distillgate.destinations import parse_destination, url_allowed, write_files
from distillgate.errors import DestinationError, UserError

FORMATS = ("jsonl", "parquet", "hf")
HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test", "golden": "golden", "holdout": "holdout"}


def check_destination(url: str, allowed: Sequence[str]) -> None:
    """``s3://`` destinations must be listed in ``allowed``; ``file://`` ones too when ``allowed`` is not empty."""
    dest = parse_destination(url)
    if not allowed and dest.scheme == "file":
        return
    if not url_allowed(url, list(allowed)):
        raise DestinationError(
            f"DESTINATION_NOT_APPROVED: {url} is not an approved export destination "
            f"(approved: {', '.join(allowed) or 'none'})",
            hint="add its prefix to export.allowed_destinations in the dataset config, or pass --allow PREFIX",
        )


def _parquet_bytes(rows: Sequence[Row]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(rows_to_table(rows), buf, compression="zstd")
    return buf.getvalue()


def _hf_card(version: Version, splits: list[str]) -> str:
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: data/{split}-*.parquet"]
    lines += ["---", "", f"# {version.manifest.get('name', 'dataset')} ({version.version_id[:16]})", "",
              "Exported by distillgate. Nested fields (label_probs, top_logprobs, teacher_card, sampling, stamp,",
              "review_before, review_after) are JSON text. Golden and holdout rows are for evaluation only.", "",
              version.manifest.get("release_notes", "")]
    return "\n".join(lines)


def export_files(version: Version, formats: Sequence[str]) -> dict[str, bytes]:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown export format(s) {unknown}", hint=f"use any of {', '.join(FORMATS)}")
    prefix = version.version_id[:16] + "/"
    files: dict[str, bytes] = {
        prefix + MANIFEST: (version.path / MANIFEST).read_bytes(),
        prefix + NOTES: (version.path / NOTES).read_bytes(),
    }
    if "parquet" in formats:
        files[prefix + ROWS_FILE] = (version.path / ROWS_FILE).read_bytes()
    if "jsonl" in formats:
        files[prefix + "rows.jsonl"] = b"".join(
            orjson.dumps(r.to_record(), option=orjson.OPT_SORT_KEYS) + b"\n" for r in version.rows
        )
    if "hf" in formats:
        by_split: dict[str, list[Row]] = {}
        for row in version.rows:
            if row.filter_status == "pass" and row.split in HF_SPLIT_NAMES:
                by_split.setdefault(HF_SPLIT_NAMES[row.split], []).append(row)
        names = [HF_SPLIT_NAMES[s] for s in HF_SPLIT_NAMES if HF_SPLIT_NAMES[s] in by_split]
        for name in names:
            files[f"{prefix}hf/data/{name}-00000-of-00001.parquet"] = _parquet_bytes(by_split[name])
        files[prefix + "hf/README.md"] = _hf_card(version, names).encode()
    return files


def export_version(
    version: Version,
    url: str,
    *,
    formats: Sequence[str] = ("jsonl", "parquet"),
    allowed: Sequence[str] = (),
    endpoint_url: str | None = None,
) -> list[str]:
    """Write the version in ``formats`` under ``url``; return the written URLs."""
    check_destination(url, allowed)
    return write_files(url, export_files(version, formats), endpoint_url=endpoint_url)
