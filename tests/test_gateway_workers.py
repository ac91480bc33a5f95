"""`gateway serve --workers N` and replicas: real `gateway serve` processes over real HTTP on one store.

- N = 2 workers on one port, many concurrent clients, a small tokens/day quota: granted never exceeds it, every
  answer's decision is in the log, `audit verify` passes; a SIGKILLed worker is restarted; SIGTERM stops them all.
- The extraction monitor's windows are shared through the store: one attacker's traffic spread round-robin over two
  replicas (or landing wherever the kernel hands it among workers) is flagged exactly as on one process, and a
  legitimate user no more; with sharing off, the spread sweep goes unseen (what the sharing is for).
- So are the content signals (prompt_drift, distribution_shift, embedding_mmd): off-domain prompts of hydra heads
  and of one user, spread over two replicas or two workers, get what one process gives them; unshared, each
  replica's embedder sees too few of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from _extraction_support import BANK_TEMPLATE, CITIES, TOPICS, banking_texts, coverage_prompts, shuffled_bank
from _gateway_support import free_port
from _reliability_support import QUOTA_POLICY, GatewayProc, log_bodies, stop, write_config
from _reliability_support import start as reliability_start
from distillgate.db import connect
from distillgate.extraction.shared import events_path
from distillgate.keys import KeyStore
from test_reliability_gateway import hammer, make_key

from conftest import run_cli
from fakes.fake_upstream import fake_upstream


def start(config: Path, tmp: Path, *args: str) -> GatewayProc:
    return reliability_start(config, tmp, *args, timeout_s=90)  # a supervisor forks its workers first


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_workers(pid: int, n: int, timeout: float = 90, without: int | None = None) -> set[int]:
    """The supervisor's n live worker pids (``without``: once that one is gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = {k for k in children(pid) if alive(k)}
        if len(kids) == n and without not in kids:
            return kids
        time.sleep(0.1)
    raise AssertionError(f"expected {n} workers of {pid}, found {children(pid)}")


def origins(db: str) -> set[str]:
    conn = connect(events_path(db) or db)
    try:
        # a process's own origin, and its "/deferred" pieces (read back by it: extraction/shared.py)
        return {str(r[0]).split("/")[0] for r in conn.execute("SELECT DISTINCT origin FROM monitor_events").fetchall()}
    finally:
        conn.close()


@pytest.mark.slow
def test_two_workers_keep_quotas_exact_restart_a_dead_worker_and_stop_on_sigterm(tmp_path: Path,
                                                                                  replica_db: str) -> None:
    key = make_key(replica_db)
    quotas = QUOTA_POLICY["quotas"]
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, replica_db, fake.base_url)
        gw = start(cfg, tmp_path, "--workers", "2")
        try:
            workers = wait_workers(gw.proc.pid, 2)

            async def load() -> list[tuple[int, dict[str, str], Any]]:
                batches = await asyncio.gather(*(hammer([gw.url], key, n=30, concurrency=20, run=f"run-{i}")
                                                 for i in range(6)))
                return [r for b in batches for r in b]

            results = asyncio.run(load())
            # a worker killed outright: the supervisor starts another; the port keeps answering
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            replaced = wait_workers(gw.proc.pid, 2, without=victim)
            assert victim not in replaced and len(replaced & workers) == 1
            after = asyncio.run(hammer([gw.url], key, n=10, concurrency=5, run="run-after"))
            assert after and {s for s, _, _ in after} <= {200, 429}
        finally:
            stop(gw)
        assert gw.proc.returncode == 0, gw.output()
        assert not any(alive(p) for p in replaced | workers), "a worker outlived its supervisor's SIGTERM"
    statuses = Counter(s for s, _, _ in results)
    assert len(results) == 180 and set(statuses) <= {200, 429}, statuses
    assert statuses[429] > 0, "the load must run into the quota for the test to mean anything"
    assert len(origins(replica_db)) >= 2, "both workers must have served part of the load"
    entries = log_bodies(replica_db)
    decisions = {e["index"]: e for e in entries if e["kind"] == "decision"}
    settlements = {e["decision_index"]: e for e in entries if e["kind"] == "settlement"}
    for status, hdrs, _ in results + after:
        d = decisions[int(hdrs["x-distillgate-decision"])]
        assert d["decision"] == ("allow" if status == 200 else "deny")
    assert sum(e["tokens_charged"] for e in settlements.values()) <= quotas["tokens_per_day"]
    per_run = Counter()
    for e in settlements.values():
        per_run[e["run"]] += e["records_charged"]
    assert max(per_run.values()) <= quotas["records_per_run"]
    res = run_cli("audit", "verify", "--db", replica_db)
    assert res.returncode == 0, res.stdout + res.stderr


def test_workers_that_cannot_open_their_store_stop_the_supervisor_with_the_reason(tmp_path: Path) -> None:
    with fake_upstream() as fake:
        cfg = write_config(tmp_path, tmp_path / "no-such-dir" / "store.db", fake.base_url)
        res = subprocess.run([sys.executable, "-m", "distillgate", "gateway", "serve", "--config", str(cfg),
                              "--port", str(free_port()), "--workers", "2"], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "does not exist" in res.stderr and "times in a row at start" in res.stderr


# -- the extraction monitor across processes ------------------------------------------------------------------------
MONITOR_POLICY: dict[str, Any] = {
    "policy_id": "watch", "allowed_projects": ["p"], "allowed_outputs": ["labels"],
    "quotas": {"default_max_tokens": 4}, "approved_models": ["fake-teacher"],
    "project_users": {"p": ["mallory", "eve", "alice"]},
}
PACE_S = 0.15  # between a reply and the next request: above the staleness bound (2 x share_interval_s + two commits)


def traffic() -> list[tuple[str, dict[str, Any]]]:
    """(user, body): a logit-bias sweep (mallory), a template sweep (eve), a banking classifier (alice), interleaved."""
    mallory = [{"model": "fake-teacher", "max_tokens": 1, "logprobs": True, "top_logprobs": 5,
                "logit_bias": {str(1000 + i): 100}, "messages": [{"role": "user", "content": "Say one word."}]}
               for i in range(20)]
    eve = [{"model": "fake-teacher", "messages": [{"role": "user", "content":
            f"Describe the {TOPICS[(i // len(CITIES)) % len(TOPICS)]} of {CITIES[i % len(CITIES)]} in three "
            "sentences for a travel guide."}]} for i in range(34)]
    alice = [{"model": "fake-teacher", "messages": [{"role": "user", "content": BANK_TEMPLATE.format(t)}]}
             for t in banking_texts()[:14]]
    out = []
    for batch in itertools.zip_longest(*[[(u, b) for b in bodies] for u, bodies in
                                         (("mallory", mallory), ("eve", eve), ("alice", alice))]):
        out.extend(x for x in batch if x is not None)
    return out


Flags = list[tuple[str, list[tuple[str, str, float]]]]


def send(urls: list[str], keys: dict[str, str], db: str,
         requests: list[tuple[str, dict[str, Any]]] | None = None) -> Flags:
    """The traffic (``traffic()`` by default), request i to urls[i % len(urls)] on a fresh connection; (user, fired
    signals) per request."""
    indices = []
    for i, (user, body) in enumerate(traffic() if requests is None else requests):
        with httpx.Client() as client:  # a new connection each time: among workers, the kernel picks one
            r = client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body, timeout=30, headers={
                "Authorization": f"Bearer {keys[user]}", "X-Policy-User": user, "X-Policy-Project": "p",
                "X-Policy-Run": f"run-{user}", "X-Policy-Output-Type": "labels"})
        assert r.status_code == 200, r.text
        indices.append((user, int(r.headers["x-distillgate-decision"])))
        time.sleep(PACE_S)
    decisions = {e["index"]: e for e in log_bodies(db) if e["kind"] == "decision"}
    return [(user, sorted((s["name"], s["scope"], round(s["value"], 6))
                          for s in decisions[i]["extra"]["extraction"]["signals"])) for user, i in indices]


def first_flag(flags: Flags, user: str, name: str) -> int | None:
    mine = [sigs for u, sigs in flags if u == user]
    return next((i for i, sigs in enumerate(mine) if any(n == name for n, _, _ in sigs)), None)


@contextlib.contextmanager
def served(tmp: Path, db: str, n: int, *, workers: int = 1, shared: bool = True,
           policy: dict[str, Any] = MONITOR_POLICY, extraction: dict[str, Any] | None = None) -> Iterator[list[str]]:
    with fake_upstream(reply="ok") as fake:
        from _gateway_support import write_policies

        cfg = tmp / f"watch-{n}-{workers}-{shared}.json"
        cfg.write_text(json.dumps({
            "policy": str(write_policies(tmp / f"{policy['policy_id']}-policies", policy)), "db": db,
            "upstreams": {"fake": {"base_url": fake.base_url, "max_retries": 0}},
            "extraction": {"shared": shared, "share_interval_s": 0.02, **(extraction or {})}}))
        gws = [start(cfg, tmp, "--workers", str(workers)) for _ in range(n)]
        try:
            if workers > 1:
                wait_workers(gws[0].proc.pid, workers)
            yield [g.url for g in gws]
        finally:
            for g in gws:
                stop(g)


def keys_for(db: str, users: tuple[str, ...] = ("mallory", "eve", "alice")) -> dict[str, str]:
    ks = KeyStore(db)
    try:
        return {u: ks.create(u)[1] for u in users}
    finally:
        ks.close()


def fresh(tmp: Path, db: str, name: str) -> str:
    """Another empty store of the same backend as ``db`` (a sibling SQLite file, or a new PostgreSQL database)."""
    if not db.startswith("postgres"):
        return str(tmp / f"{name}.db")
    base, _, _ = db.rpartition("/")
    conn = connect(db)
    try:
        conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return f"{base}/{name}"


@pytest.mark.slow
def test_an_attack_spread_over_two_replicas_is_flagged_as_on_one_process(tmp_path: Path, replica_db: str) -> None:
    one_db = fresh(tmp_path, replica_db, "one_process")
    with served(tmp_path, one_db, 1) as urls:
        alone = send(urls, keys_for(one_db), one_db)
    with served(tmp_path, replica_db, 2) as urls:
        spread = send(urls, keys_for(replica_db), replica_db)
    assert len(origins(replica_db)) == 2
    assert spread == alone  # every request: the same signals, scopes and values
    assert first_flag(alone, "mallory", "logit_bias_sweep") == 15  # the 16th distinct pattern: threshold 16
    assert first_flag(alone, "eve", "template_sweep") is not None
    assert not any(scope in ("user", "key") for u, sigs in alone if u == "alice" for _, scope, _ in sigs)

    apart_db = fresh(tmp_path, replica_db, "unshared")
    with served(tmp_path, apart_db, 2, shared=False) as urls:
        apart = send(urls, keys_for(apart_db), apart_db)
    assert first_flag(apart, "mallory", "logit_bias_sweep") is None  # 10 patterns each: the dodge sharing stops


@pytest.mark.slow
def test_an_attack_landing_on_either_worker_is_flagged_as_on_one_process(tmp_path: Path) -> None:
    db = str(tmp_path / "workers.db")
    with served(tmp_path, db, 1, workers=2) as urls:
        flags = send(urls, keys_for(db), db)
    assert len(origins(db)) == 2, "the kernel gave every connection to one worker: the test proved nothing"
    assert first_flag(flags, "mallory", "logit_bias_sweep") == 15
    assert first_flag(flags, "eve", "template_sweep") is not None
    assert not any(scope in ("user", "key") for u, sigs in flags if u == "alice" for _, scope, _ in sigs)


# -- the content signals across processes (embedded pieces shared through the store) ---------------------------------
HEADS = tuple(f"h{i}" for i in range(4))
CONTENT_USERS = ("alice", "cov", *HEADS)
CONTENT_POLICY: dict[str, Any] = {
    **MONITOR_POLICY, "policy_id": "content", "project_users": {"p": list(CONTENT_USERS)},
    # windows short enough for a few dozen paced requests: prompt_drift from 10 embedded requests, the project's
    # MMD over its last 40 pieces (recomputed every 50)
    "extraction": {"signals": {"prompt_drift": {"window": 20, "min_requests": 10},
                               "embedding_mmd": {"window": 40, "min_requests": 20}}},
}


def chat(text: str) -> dict[str, Any]:
    return {"model": "fake-teacher", "messages": [{"role": "user", "content": text}]}


def content_traffic() -> list[tuple[str, dict[str, Any]]]:
    """A legitimate banking user (alice) and, two requests in four, off-domain prompts: 4 hydra heads of 4 requests,
    then one user (cov) of 12. Spread over two replicas each sees 2 of a head's requests, 6 of cov's and 36 of the
    project's pieces (its MMD is first computed at 50)."""
    cov = iter(coverage_prompts(100, seed=9))
    attack = iter([(h, chat(next(cov))) for h in HEADS for _ in range(4)] + [("cov", chat(next(cov)))
                                                                            for _ in range(12)])
    alice = iter(("alice", chat(t)) for t in shuffled_bank()[3000:3100])
    out = []
    for i in range(72):
        step = next(attack, None) if i % 4 in (1, 2) else None
        out.append(step if step is not None else next(alice))
    return out


def fired(flags: Flags) -> dict[str, set[str]]:
    """user (the heads as ``h``) -> the names of the signals fired on its requests."""
    out: dict[str, set[str]] = {}
    for user, sigs in flags:
        out.setdefault("h" if user in HEADS else user, set()).update(name for name, _, _ in sigs)
    return out


def content_extraction(tmp: Path) -> dict[str, Any]:
    """The gateway's ``extraction`` section: the hashing embedder, and 1,000 banking messages approved for p."""
    bank = shuffled_bank()
    ref = tmp / "approved.jsonl"
    ref.write_text("".join(json.dumps(chat(t)) + "\n" for t in bank[:1000]))
    return {"embedder": "hashing", "references": {"p": str(ref)}}


def expect_content_signals(seen: dict[str, set[str]]) -> None:
    assert seen["cov"] == {"prompt_drift", "distribution_shift", "embedding_mmd"}
    assert seen["h"] == {"distribution_shift"}
    assert seen["alice"] == set()  # the legitimate user: no signal of any scope


@pytest.mark.slow
def test_content_signals_of_an_attack_spread_over_two_replicas_are_those_of_one_process(tmp_path: Path,
                                                                                        replica_db: str) -> None:
    extraction = content_extraction(tmp_path)

    def run(db: str, n: int, shared: bool = True) -> Flags:
        with served(tmp_path, db, n, shared=shared, policy=CONTENT_POLICY, extraction=extraction) as urls:
            return send(urls, keys_for(db, CONTENT_USERS), db, content_traffic())

    one_db = fresh(tmp_path, replica_db, "content_one_process")
    alone = run(one_db, 1)
    spread = run(replica_db, 2)
    assert len(origins(replica_db)) == 2
    assert spread == alone  # every request: the same signals, scopes and values
    expect_content_signals(fired(alone))

    apart_db = fresh(tmp_path, replica_db, "content_unshared")
    apart = fired(run(apart_db, 2, shared=False))
    assert "prompt_drift" not in apart["cov"] and "embedding_mmd" not in apart["cov"]  # 6 of cov's requests each
    assert apart["h"] == set() and apart["alice"] == set()


@pytest.mark.slow
def test_content_signals_of_an_attack_landing_on_either_worker_are_those_of_one_process(tmp_path: Path) -> None:
    db = str(tmp_path / "workers.db")
    with served(tmp_path, db, 1, workers=2, policy=CONTENT_POLICY, extraction=content_extraction(tmp_path)) as urls:
        flags = send(urls, keys_for(db, CONTENT_USERS), db, content_traffic())
    assert len(origins(db)) == 2, "the kernel gave every connection to one worker: the test proved nothing"
    expect_content_signals(fired(flags))
