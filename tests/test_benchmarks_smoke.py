"""The quick benchmarks still run against the code they measure (tiny sizes, results written to a temporary dir).

Benchmarks reach into internals (the store's job queue, the monitor's request path); these runs catch a refactor that
breaks them. They assert that the scripts finish and write their figures, not the figures themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, env=env, timeout=300,
                   capture_output=True)


def test_foundation_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "foundation.json"
    _run("foundation.py", "--decisions", "200", "--entries", "96", "--verify-entries", "300", "--out", str(out))
    figures = json.loads(out.read_text())
    assert figures["verify_entries"] == 300 and figures["appends_per_s_16_writers"] > 0


def test_extraction_observe_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "observe.json"
    _run("extraction_observe.py", "--requests", "1200", "--out", str(out))
    figures = json.loads(out.read_text())
    assert figures["requests"] == 1200 and figures["observe"]["p50_us"] > 0


def test_extraction_share_rows_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "share_rows.json"
    _run("extraction_share_rows.py", "--no-callgrind", "--out", str(out))
    figures = json.loads(out.read_text())
    assert figures["dim_384"]["embedded_row_bytes"] > figures["dim_256"]["embedded_row_bytes"] > 0


def test_store_backends_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "store_backends.json"
    _run("store_backends.py", "--entries", "96", "--out", str(out))
    figures = json.loads(out.read_text())
    assert figures["postgres_appends_per_s_16_writers"] > 0 and figures["sqlite_appends_per_s_procs_2x16"] > 0
