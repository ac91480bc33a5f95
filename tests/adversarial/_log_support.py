"""A real `distillgate gateway serve` on loopback with the fake teacher, for the decision-log and policy-tool attacks.

``served(tmp)`` starts the fake teacher (tests/fakes) and a gateway subprocess over one SQLite store, with API keys
made by `distillgate keys create`; ``Served.chat`` sends one request over real HTTP. ``rows`` and ``sql`` read and
write the store's file directly, as an attacker with write access to the database would.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _reliability_support import GatewayProc, start, stop, write_config

from conftest import run_cli
from fakes.fake_upstream import FakeUpstream, fake_upstream

STRICT: dict[str, Any] = {
    "policy_id": "strict",
    "allowed_projects": ["strict"],
    "allowed_outputs": ["labels", "evaluation"],
    "quotas": {"tokens_per_day": 1_000_000, "records_per_run": 1000, "default_max_tokens": 16},
    "approved_models": ["fake-teacher", "fake-teacher-large"],
    "project_users": {"strict": ["alice"]},
    "audit": {"checkpoint_every": 5},
}
LOOSE: dict[str, Any] = {
    "policy_id": "loose",
    "allowed_projects": ["loose"],
    "allowed_outputs": ["labels", "evaluation"],
    "quotas": {"default_max_tokens": 16},
    "approved_models": ["fake-teacher"],
    "project_users": {"loose": ["mallory"]},
}


@dataclass
class Served:
    gp: GatewayProc
    fake: FakeUpstream
    db: Path
    keys: dict[str, str]  # user -> API key
    policy_dir: Path

    @property
    def url(self) -> str:
        return self.gp.url

    def chat(self, *, user: str = "alice", project: str = "strict", run: str = "run-1",
             output_type: str = "labels", content: str = "hello", key: str | None = None,
             headers: dict[str, str] | None = None, model: str = "fake-teacher") -> httpx.Response:
        sent = {"X-Policy-User": user, "X-Policy-Project": project, "X-Policy-Run": run,
                "X-Policy-Output-Type": output_type, **(headers or {})}
        token = self.keys.get(user) if key is None else key
        if token:
            sent["Authorization"] = f"Bearer {token}"
        return httpx.post(self.url + "/v1/chat/completions", headers=sent, timeout=30,
                          json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}]})


def create_key(db: Path, user: str) -> str:
    res = run_cli("keys", "create", "--user", user, "--db", str(db))
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()[0].strip()


@contextlib.contextmanager
def served(tmp: Path, *, policies: tuple[dict[str, Any], ...] = (STRICT, LOOSE), users: tuple[str, ...] = ("alice",),
           db_path: Path | None = None, upstream: dict[str, Any] | None = None, **config: Any) -> Iterator[Served]:
    """A gateway over ``db_path`` (default: a new ``tmp/gw.db``), with a fresh key for each of ``users``;
    ``upstream``: more settings of the fake teacher's upstream entry (e.g. ``api_key_env``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    db = db_path or tmp / "gw.db"
    keys = {u: create_key(db, u) for u in users}
    with fake_upstream() as fake:
        cfg = write_config(tmp, db, fake.base_url, policies=policies, **config)
        if upstream:
            data = json.loads(cfg.read_text())
            data["upstreams"]["fake"].update(upstream)
            cfg.write_text(json.dumps(data))
        gp = start(cfg, tmp)
        try:
            yield Served(gp, fake, db, keys, tmp / "policies")
        finally:
            stop(gp)


def rows(db: Path, sql_text: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql_text, args).fetchall()
    finally:
        conn.close()


def sql(db: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            for text, args in statements:
                conn.execute(text, args)
    finally:
        conn.close()


def bodies(db: Path) -> list[dict[str, Any]]:
    return [json.loads(body) for (body,) in rows(db, "SELECT body FROM log ORDER BY idx")]
