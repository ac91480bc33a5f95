"""Real `distillgate gateway serve` subprocesses on loopback, sharing one store (SQLite or PostgreSQL)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _gateway_support import free_port, write_policies
from distillgate.db import connect

QUOTA_POLICY: dict[str, Any] = {
    "policy_id": "quota",
    "allowed_projects": ["q"],
    "allowed_outputs": ["summaries"],
    "quotas": {"tokens_per_day": 400, "records_per_run": 12, "default_max_tokens": 8},
    "approved_models": ["fake-teacher"],
    "project_users": {"q": ["alice"]},
}


@dataclass
class GatewayProc:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(tmp: Path, db: Path | str, upstream_url: str, *, policies: tuple[dict[str, Any], ...] = (QUOTA_POLICY,),
                 **extra: Any) -> Path:
    policy_dir = write_policies(tmp / "policies", *policies)
    cfg: dict[str, Any] = {"policy": str(policy_dir), "db": str(db),
                           "upstreams": {"fake": {"base_url": upstream_url, "max_retries": 0, "timeout_s": 5.0,
                                                  "max_backoff_s": 0.1}},
                           "reclaim_interval_s": 0.3, "reservation_ttl_s": 8.0, **extra}
    path = tmp / f"gateway-{len(list(tmp.glob('gateway-*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def start(config: Path, tmp: Path, *args: str, timeout_s: float = 60) -> GatewayProc:
    """`gateway serve --config CONFIG` on a free port (``args``: more options), once /healthz answers."""
    port = free_port()
    log_path = tmp / f"gateway-{port}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distillgate", "gateway", "serve", "--config", str(config),
                                 "--port", str(port), *args], env=dict(os.environ), stdout=out,
                                stderr=subprocess.STDOUT)
    gp = GatewayProc(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(gp.url + "/healthz", timeout=2).status_code == 200:
                return gp
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"gateway did not start:\n{gp.output()}")
        time.sleep(0.1)


def stop(gp: GatewayProc, sig: int = signal.SIGTERM) -> None:
    if gp.proc.poll() is None:
        gp.proc.send_signal(sig)
    try:
        gp.proc.wait(20)
    except subprocess.TimeoutExpired:
        gp.proc.kill()
        gp.proc.wait(5)


@contextlib.contextmanager
def gateways(config: Path, tmp: Path, n: int) -> Iterator[list[GatewayProc]]:
    procs: list[GatewayProc] = []
    try:
        for _ in range(n):
            procs.append(start(config, tmp))
        yield procs
    finally:
        for gp in procs:
            stop(gp)


def log_bodies(db: Path | str) -> list[dict[str, Any]]:
    """Every decision-log entry body, read straight from the database (no store code involved)."""
    conn = connect(db)
    try:
        rows = conn.execute("SELECT idx, body FROM log ORDER BY idx").fetchall()
    finally:
        conn.close()
    return [json.loads(bytes(body)) | {"index": idx} for idx, body in rows]


def held_reservations(db: Path | str) -> int:
    conn = connect(db)
    try:
        (n,) = conn.execute("SELECT count(*) FROM reservations WHERE state='held'").fetchone()
    finally:
        conn.close()
    return int(n)
