"""Shared fixtures. Subprocesses started by tests import this checkout's ``src`` (not an installed copy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
DATA = ROOT / "data"

os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m distillgate ARGS`` as a real subprocess."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "distillgate", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium, which every browser test drives through Playwright.

    A missing browser fails each browser test the same way (never a skip here and a failure there):
    `make test` installs it (scripts/system-deps.sh).
    """
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is missing: run `make system-deps` (apt-get install -y chromium)")
    return CHROMIUM


@pytest.fixture
def cli_run():
    return run_cli


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A real S3-compatible server on loopback (moto's server mode); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "DISTILLGATE_S3_ENDPOINT": endpoint}.items():
        monkeypatch.setenv(key, value)
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def review_wc(tmp_path: Path):
    """The review page's built working copy (see ``_web_support.make_review_dataset``), open for the test."""
    from _web_support import make_review_dataset
    from distillgate.data.store import WorkingCopy

    copy = WorkingCopy.open(make_review_dataset(tmp_path))
    yield copy
    copy.close()


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server on loopback for the whole session (tests/_pg_support.py); fails if none is
    installed."""
    from _pg_support import PgServer

    server = PgServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server) -> str:
    """An empty PostgreSQL database of its own for one test."""
    return str(pg_server.fresh_db())


def _store_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    monkeypatch.setenv("DISTILLGATE_SIGNING_KEY", str(tmp_path / "signing-key.pem"))
    return str(request.getfixturevalue("pg_server").fresh_db())


@pytest.fixture(params=["sqlite", "postgres"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``--db`` of an empty store on each backend: a SQLite file, or a fresh PostgreSQL database (its signing key
    named by $DISTILLGATE_SIGNING_KEY, as every replica's must be)."""
    return _store_db(request, tmp_path, monkeypatch)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def replica_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``store_db`` for the multi-process tests (10-15 s each): the PostgreSQL runs are in `make test-slow`, and
    tests/test_storage_postgres.py keeps one PostgreSQL gateway check in the default suite."""
    return _store_db(request, tmp_path, monkeypatch)
