"""Quota exactness, reclaim of leaked reservations and crash safety through real `gateway serve` processes.

Two or more gateway processes share one store (each test runs on SQLite and, in the slow suite, on PostgreSQL:
``replica_db``); clients hit them concurrently; gateways are SIGKILLed with
requests in flight. The checks read the store file directly and run `distillgate audit verify`.
"""

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
    gateways,
    held_reservations,
    log_bodies,
    start,
    stop,
    write_config,
)
from distillgate.keys import KeyStore

from conftest import run_cli
from fakes.fake_upstream import Behaviour, fake_upstream


def make_key(db: Path | str, user: str = "alice") -> str:
    ks = KeyStore(db)
    try:
        return ks.create(user)[1]
    finally:
        ks.close()


def headers(key: str, run: str = "r1") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Policy-User": "alice", "X-Policy-Project": "q",
            "X-Policy-Run": run, "X-Policy-Output-Type": "summaries"}


BODY = {"model": "fake-teacher", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4}


async def hammer(urls: list[str], key: str, n: int, concurrency: int, run: str = "r1",
                 timeout: float = 30) -> list[tuple[int, dict[str, str], Any]]:
    """n requests spread over the gateways, `concurrency` at a time; returns (status, headers, json) per answer."""
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[int, dict[str, str], Any]] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        async with sem:
            try:
                r = await client.post(urls[i % len(urls)] + "/v1/chat/completions", json=BODY,
                                      headers=headers(key, run), timeout=timeout)
            except httpx.TransportError:
                return  # no answer: the client was not acknowledged
            results.append((r.status_code, dict(r.headers), r.json()))

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(one(i, client) for i in range(n)))
    return results


def test_quota_exact_across_two_gateway_processes(tmp_path: Path, replica_db: str) -> None:
    db = replica_db  # SQLite file or PostgreSQL database (conftest.py)
    key = make_key(db)
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, db, fake.base_url)
        with gateways(cfg, tmp_path, 2) as gws:
            results = asyncio.run(hammer([g.url for g in gws], key, n=80, concurrency=24))
    assert len(results) == 80
    statuses = Counter(s for s, _, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    quotas = QUOTA_POLICY["quotas"]
    # records_per_run is the binding quota here: exactly that many answers are granted, never one more
    assert statuses[200] == quotas["records_per_run"]
    entries = log_bodies(db)
    decisions = {e["index"]: e for e in entries if e["kind"] == "decision"}
    settlements = [e for e in entries if e["kind"] == "settlement"]
    assert len(decisions) == 80
    # every answer the client got names its decision, and that decision says the same thing
    for status, hdrs, _ in results:
        d = decisions[int(hdrs["x-distillgate-decision"])]
        assert d["decision"] == ("allow" if status == 200 else "deny")
    granted_tokens = sum(s["tokens_charged"] for s in settlements)
    granted_records = sum(s["records_charged"] for s in settlements)
    assert granted_records == quotas["records_per_run"]
    assert granted_tokens <= quotas["tokens_per_day"]
    assert granted_tokens == sum(body["usage"]["total_tokens"] for s, _, body in results if s == 200)
    assert len(settlements) == statuses[200] and held_reservations(db) == 0
    res = run_cli("audit", "verify", "--db", str(db))
    assert res.returncode == 0, res.stdout + res.stderr


def test_tokens_per_day_never_exceeded_under_concurrency(tmp_path: Path, replica_db: str) -> None:
    db = replica_db  # SQLite file or PostgreSQL database (conftest.py)
    key = make_key(db)
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, db, fake.base_url)
        with gateways(cfg, tmp_path, 3) as gws:  # many runs: the daily token quota binds, not records/run
            urls = [g.url for g in gws]

            async def all_runs() -> list[tuple[int, dict[str, str], Any]]:
                batches = await asyncio.gather(*(hammer(urls, key, n=10, concurrency=5, run=f"run-{i}")
                                                 for i in range(8)))
                return [r for b in batches for r in b]

            results = asyncio.run(all_runs())
    statuses = Counter(s for s, _, _ in results)
    assert statuses[200] > 0 and statuses[429] > 0, statuses
    entries = log_bodies(db)
    charged = sum(e["tokens_charged"] for e in entries if e["kind"] == "settlement")
    assert charged <= QUOTA_POLICY["quotas"]["tokens_per_day"]
    reasons = Counter(r for e in entries if e["kind"] == "decision" for r in e["reasons"])
    assert reasons["TOKENS_PER_DAY_EXCEEDED"] > 0, reasons


def _wait_in_flight(fake_requests: Any, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(fake_requests()) < n:
        assert time.monotonic() < deadline, f"only {len(fake_requests())} requests reached the upstream"
        time.sleep(0.05)


def _wait_committed(db: Path | str, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while held_reservations(db) < n:
        assert time.monotonic() < deadline, f"only {held_reservations(db)} of {n} reservations committed"
        time.sleep(0.02)
    assert held_reservations(db) == n


def _fire_and_forget(url: str, key: str, n: int) -> list[httpx.Response | BaseException]:
    """Start n requests in threads that may never be answered (their gateway gets killed)."""
    import concurrent.futures

    out: list[httpx.Response | BaseException] = []

    def one() -> None:
        try:
            out.append(httpx.post(url + "/v1/chat/completions", json=BODY, headers=headers(key), timeout=30))
        except BaseException as exc:  # the kill makes these fail; that is the point
            out.append(exc)

    pool = concurrent.futures.ThreadPoolExecutor(n)
    for _ in range(n):
        pool.submit(one)
    pool.shutdown(wait=False)
    return out


def test_sigkilled_gateway_leaks_reservations_that_a_survivor_reclaims(tmp_path: Path, replica_db: str) -> None:
    db = replica_db  # SQLite file or PostgreSQL database (conftest.py)
    key = make_key(db)
    # five requests held at once: each reserves its body's bytes as the prompt bound, more than 400 tokens in all
    roomy = {**QUOTA_POLICY, "quotas": {**QUOTA_POLICY["quotas"], "tokens_per_day": 4000}}
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, db, fake.base_url, policies=(roomy,), reservation_ttl_s=6.0)
        survivor = start(cfg, tmp_path)
        victim = start(cfg, tmp_path)
        try:
            fake.push(*[Behaviour.stall(10)] * 5)
            answers = _fire_and_forget(victim.url, key, 5)
            _wait_in_flight(lambda: fake.requests, 5)
            # a request is forwarded while its decision's commit runs (aadmit_early): wait for the commits
            _wait_committed(db, 5)
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            # until the TTL passes the reservations count against the quota; then the survivor refunds them
            deadline = time.monotonic() + 30
            while held_reservations(db) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert held_reservations(db) == 0
            fake.clear()
            ok = httpx.post(survivor.url + "/v1/chat/completions", json=BODY, headers=headers(key), timeout=10)
            assert ok.status_code == 200
        finally:
            stop(survivor)
            stop(victim)
    assert all(not isinstance(a, httpx.Response) or a.status_code >= 500 for a in answers)
    entries = log_bodies(db)
    reclaims = [e for e in entries if e["kind"] == "reclaim"]
    assert len(reclaims) == 5 and all(e["reasons"] == ["RESERVATION_EXPIRED"] for e in reclaims)
    decided = {e["index"] for e in entries if e["kind"] == "decision" and e["decision"] == "allow"}
    assert {e["decision_index"] for e in reclaims} <= decided
    # every record of the killed requests is back in the quota: the usage counters equal what was settled
    charged = sum(e["records_charged"] for e in entries if e["kind"] == "settlement")
    assert charged == 1
    res = run_cli("audit", "verify", "--db", str(db))
    assert res.returncode == 0, res.stdout + res.stderr


def test_restarted_gateway_reclaims_after_sole_gateway_was_killed(tmp_path: Path, replica_db: str) -> None:
    db = replica_db
    key = make_key(db)
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, db, fake.base_url, reservation_ttl_s=6.0)
        gw = start(cfg, tmp_path)
        fake.push(*[Behaviour.stall(10)] * 3)
        _fire_and_forget(gw.url, key, 3)
        _wait_in_flight(lambda: fake.requests, 3)
        _wait_committed(db, 3)
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
        assert held_reservations(db) == 3
        fake.clear()
        again = start(cfg, tmp_path)
        try:
            deadline = time.monotonic() + 30
            while held_reservations(db) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop(again)
    assert held_reservations(db) == 0
    assert sum(e["kind"] == "reclaim" for e in log_bodies(db)) == 3


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_decision(tmp_path: Path, replica_db: str) -> None:
    db = replica_db
    key = make_key(db)
    big = {**QUOTA_POLICY, "quotas": {"tokens_per_day": 10_000_000, "records_per_run": 1_000_000,
                                      "default_max_tokens": 8}}
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, db, fake.base_url, policies=(big,))
        for round_ in range(3):
            gw = start(cfg, tmp_path)
            results: list[tuple[int, dict[str, str], Any]] = []

            async def load(target: GatewayProc, out: list[tuple[int, dict[str, str], Any]], wait_s: float) -> None:
                alive = True

                async def worker(client: httpx.AsyncClient) -> None:
                    nonlocal alive
                    while alive:
                        try:
                            r = await client.post(target.url + "/v1/chat/completions", json=BODY,
                                                  headers=headers(key), timeout=10)
                        except httpx.TransportError:
                            alive = False  # no answer: this request was not acknowledged
                            return
                        out.append((r.status_code, dict(r.headers), None))

                async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
                    workers = [asyncio.ensure_future(worker(client)) for _ in range(32)]
                    await asyncio.sleep(wait_s)
                    target.proc.send_signal(signal.SIGKILL)  # mid-load: requests in every state
                    await asyncio.gather(*workers)

            asyncio.run(load(gw, results, 1.5 + round_))
            gw.proc.wait(10)
            acknowledged = [(s, int(h["x-distillgate-decision"])) for s, h, _ in results
                            if "x-distillgate-decision" in h]
            assert len(acknowledged) > 20, f"round {round_}: only {len(acknowledged)} answers before the kill"
            entries = {e["index"]: e for e in log_bodies(db)}
            for status, index in acknowledged:
                assert entries[index]["kind"] == "decision", index
                assert entries[index]["decision"] == ("allow" if status == 200 else "deny")
            settled = {e["decision_index"] for e in entries.values() if e["kind"] == "settlement"}
            assert {i for s, i in acknowledged if s == 200} <= settled  # settle: before_reply
            res = run_cli("audit", "verify", "--db", str(db))
            assert res.returncode == 0, f"round {round_}: " + res.stdout + res.stderr
