"""Replicas on one PostgreSQL: three `gateway serve` processes, hundreds of concurrent clients, a replica SIGKILLed
and restarted, and the database itself restarted under load. Everything is checked from the database and with
`distillgate audit verify --db postgresql://...`."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from _reliability_support import (
    QUOTA_POLICY,
    GatewayProc,
    held_reservations,
    log_bodies,
    start,
    stop,
    write_config,
)
from distillgate.db import connect
from distillgate.ledger.schema import MIGRATIONS, applied
from test_reliability_gateway import (
    BODY,
    _fire_and_forget,
    _wait_committed,
    _wait_in_flight,
    hammer,
    headers,
    make_key,
)

from conftest import run_cli
from fakes.fake_upstream import Behaviour, fake_upstream


@pytest.fixture
def pg_db(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DISTILLGATE_SIGNING_KEY", str(tmp_path / "signing-key.pem"))  # one key, every replica
    return pg_url


@pytest.mark.slow
def test_three_replicas_hundreds_of_clients_a_sigkill_and_a_restart(tmp_path: Path, pg_db: str) -> None:
    key = make_key(pg_db)
    quotas = QUOTA_POLICY["quotas"]
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, pg_db, fake.base_url, reservation_ttl_s=6.0)
        gws: list[GatewayProc] = [start(cfg, tmp_path) for _ in range(3)]
        try:
            # a replica dies with requests in flight: their reservations leak (and hold quota until reclaimed)
            victim = gws[2]
            fake.push(*[Behaviour.stall(10)] * 3)
            _fire_and_forget(victim.url, key, 3)
            _wait_in_flight(lambda: fake.requests, 3)
            _wait_committed(pg_db, 3)
            held = held_reservations(pg_db)
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            fake.clear()
            gws[2] = start(cfg, tmp_path)  # restarted; all three reclaim what the dead one leaked
            urls = [g.url for g in gws]
            # the leaked reservations hold nearly the whole (small) daily quota until their lease runs out: wait for
            # the three replicas' reclaim loops to free them, or every request of the load would be refused
            deadline = time.monotonic() + 40
            while held_reservations(pg_db) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert held_reservations(pg_db) == 0, "the dead replica's reservations were never reclaimed"

            async def load() -> list[tuple[int, dict[str, str], Any]]:
                # 8 runs x 25 clients: records/run binds each run, the daily token quota binds the project
                batches = await asyncio.gather(*(hammer(urls, key, n=25, concurrency=25, run=f"run-{i}")
                                                 for i in range(8)))
                return [r for b in batches for r in b]

            results = asyncio.run(load())
            deadline = time.monotonic() + 40
            while held_reservations(pg_db) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert held_reservations(pg_db) == 0
        finally:
            for g in gws:
                stop(g)
    statuses = Counter(s for s, _, _ in results)
    assert len(results) == 200 and set(statuses) <= {200, 429}, statuses
    entries = log_bodies(pg_db)
    decisions = {e["index"]: e for e in entries if e["kind"] == "decision"}
    settlements = {e["decision_index"]: e for e in entries if e["kind"] == "settlement"}
    for status, hdrs, _ in results:  # every answered request's decision and settlement are in the log
        d = decisions[int(hdrs["x-distillgate-decision"])]
        assert d["decision"] == ("allow" if status == 200 else "deny")
        if status == 200:
            assert d["index"] in settlements
    charged = sum(e["tokens_charged"] for e in settlements.values())
    assert charged <= quotas["tokens_per_day"], "granted tokens exceed the daily quota"
    per_run = Counter()
    for e in settlements.values():
        per_run[e["run"]] += e["records_charged"]
    assert max(per_run.values()) <= quotas["records_per_run"]
    reasons = Counter(r for e in decisions.values() for r in e["reasons"])
    assert reasons["TOKENS_PER_DAY_EXCEEDED"] + reasons["RECORDS_PER_RUN_EXCEEDED"] > 0, reasons
    # each leaked reservation was reclaimed exactly once, although three replicas ran reclaim
    reclaims = Counter(e["reservation_id"] for e in entries if e["kind"] == "reclaim")
    assert len(reclaims) == held and set(reclaims.values()) == {1}, reclaims
    res = run_cli("audit", "verify", "--db", pg_db)
    assert res.returncode == 0, res.stdout + res.stderr


def test_postgres_restarted_under_load_answers_503_then_recovers(tmp_path: Path, pg_db: str, pg_server: Any) -> None:
    key = make_key(pg_db)
    roomy = {**QUOTA_POLICY, "quotas": {"tokens_per_day": 1_000_000, "records_per_run": 1_000_000,
                                        "default_max_tokens": 8}}
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, pg_db, fake.base_url, policies=(roomy,))
        gw = start(cfg, tmp_path)
        try:
            url = gw.url + "/v1/chat/completions"
            assert httpx.post(url, json=BODY, headers=headers(key), timeout=10).status_code == 200
            pg_server.stop()
            forwarded = len(fake.requests)
            down = [httpx.post(url, json=BODY, headers=headers(key), timeout=20) for _ in range(5)]
            assert [r.status_code for r in down] == [503] * 5, [r.text for r in down]
            assert len(fake.requests) == forwarded, "nothing is forwarded while the decision log is down"
            pg_server.start()
            deadline = time.monotonic() + 30
            while True:
                r = httpx.post(url, json=BODY, headers=headers(key), timeout=20)
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert r.status_code == 200, r.text
        finally:
            stop(gw)
            pg_server.start()  # a no-op when it is up: the next tests need it whatever happened here
    res = run_cli("audit", "verify", "--db", pg_db)
    assert res.returncode == 0, res.stdout + res.stderr
    entries = log_bodies(pg_db)
    assert all(e["kind"] != "decision" or e["index"] in {s.get("decision_index") for s in entries}
               for e in entries if e.get("decision") == "allow")


def test_migrations_from_an_empty_database_are_recorded_once(pg_db: str) -> None:
    from distillgate.ledger import Store

    Store.open(pg_db).close()
    Store.open(pg_db).close()
    conn = connect(pg_db)
    try:
        assert applied(conn) == [name for name, _ in MIGRATIONS]
    finally:
        conn.close()


@pytest.mark.slow
def test_distillgate_run_on_postgres(tmp_path: Path, pg_db: str) -> None:
    """`distillgate run` with `store: postgresql://...`: every teacher call is a decision in PostgreSQL, the run's
    export carries its log slice, and `audit verify` / `audit export` read the same database."""
    from test_run_pipeline import tiny_student, write_project

    tiny_student(tmp_path / "tiny")
    with fake_upstream(reply="card_arrival") as fake:
        project = write_project(tmp_path, fake.base_url, store=pg_db)
        res = run_cli("run", str(project), timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "work" / "distillgate.db").exists()
    bodies = [e for e in log_bodies(pg_db) if e.get("run") == "tiny-run-1" and e["kind"] == "decision"]
    inference = [b for b in bodies if b["request_kind"] == "inference" and b["decision"] == "allow"]
    assert len(inference) == 30 + 6  # 30 generated rows + 6 evaluation items for the teacher
    assert (tmp_path / "bundles" / "tiny-run-1" / "decision-log" / "checkpoint.json").exists()
    verify = run_cli("audit", "verify", "--db", pg_db)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    out = (tmp_path / "bundles" / "again").as_uri() + "/"
    exported = run_cli("audit", "export", "--db", pg_db, "--run", "tiny-run-1", "--to", out,
                       "--policy", str(tmp_path / "policy.json"), "--user", "alice")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (tmp_path / "bundles" / "again" / "manifest.json").exists()


def test_an_unreachable_database_is_a_clear_error_without_the_password() -> None:
    from distillgate.errors import StoreUnavailable
    from distillgate.ledger import Store

    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL") as caught:
        Store.open("postgresql://alice:hunter2@127.0.0.1:1/nowhere")
    assert "hunter2" not in str(caught.value) and "alice:***@" in str(caught.value)


def test_a_postgres_store_without_a_named_signing_key_is_refused(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from distillgate.errors import UserError
    from distillgate.ledger import Store

    monkeypatch.delenv("DISTILLGATE_SIGNING_KEY", raising=False)
    with pytest.raises(UserError, match="DISTILLGATE_SIGNING_KEY"):
        Store.open(pg_url)
    res = run_cli("audit", "verify", "--db", pg_url)  # verify needs no private key: an empty log has no key yet
    assert res.returncode != 0 and "no public key" in res.stderr
