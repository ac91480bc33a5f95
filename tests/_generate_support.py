"""Fixtures for the generation tests: a small working copy of real banking77 messages, log counting."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path
from typing import Any

from distillgate.data.config import ColumnMapping, IngestConfig
from distillgate.data.ingest import ingest_file
from distillgate.data.store import WorkingCopy

DATA = Path(__file__).resolve().parent.parent / "data"


def banking_csv(tmp: Path, n: int) -> Path:
    """The first ``n`` banking77 training messages (PolyAI, CC BY 4.0) as a traffic CSV with ids."""
    out = tmp / "traffic.csv"
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as src, \
            out.open("w", newline="", encoding="utf-8") as dst:
        writer = csv.writer(dst)
        writer.writerow(["id", "text", "category"])
        for i, rec in enumerate(csv.DictReader(src)):
            if i >= n:
                break
            writer.writerow([f"m{i}", rec["text"], rec["category"]])
    return out


def make_dataset(tmp: Path, n: int) -> Path:
    """A working copy at ``tmp/ds`` with ``n`` ingested inputs (ids ``traffic-m0`` ...)."""
    root = tmp / "ds"
    cfg = IngestConfig(columns=ColumnMapping(input="text", record_id="id", reference_label="category"))
    with WorkingCopy.create(root, {"name": "gen-test"}) as wc:
        wc.add_inputs(ingest_file(banking_csv(tmp, n), cfg).rows)
    return root


def stored_rows(root: Path) -> list[dict[str, Any]]:
    with WorkingCopy.open(root) as wc:
        return [r.to_record() for r in wc.rows()]


def count_rows(root: Path) -> int:
    conn = sqlite3.connect(root / "working.sqlite", timeout=30)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
    finally:
        conn.close()


def decisions(log: list[dict[str, Any]], run: str, decision: str = "allow") -> list[dict[str, Any]]:
    return [e for e in log if e["kind"] == "decision" and e["run"] == run and e["decision"] == decision]
