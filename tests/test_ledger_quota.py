from __future__ import annotations

import multiprocessing as mp
import threading
from pathlib import Path

import pytest

from distillgate.errors import UserError
from distillgate.ledger import Store
from distillgate.ledger.store import utc_day
from distillgate.policy import policy_from_data

from _foundation_support import SEED, request

SMALL = policy_from_data({**SEED, "quotas": {"tokens_per_day": 1000, "records_per_run": 40}})
TOKENS_BIND = policy_from_data({**SEED, "quotas": {"tokens_per_day": 1000, "records_per_run": 5000}})


def test_reserve_settle_refund_lifecycle(store_db: str) -> None:
    with Store.open(store_db) as store:
        a = store.admit(SMALL, request(max_tokens=100, prompt_tokens=20))
        assert a.decision.allowed and a.tokens_reserved == 120 and a.reservation_id
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 120
        settle = store.settle(a.reservation_id, prompt_tokens=20, completion_tokens=30)
        assert settle.body["tokens_charged"] == 50 and settle.body["tokens_refunded"] == 70
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 50
        with pytest.raises(UserError, match="already settled"):
            store.settle(a.reservation_id, prompt_tokens=1, completion_tokens=1)
        b = store.admit(SMALL, request(max_tokens=100, prompt_tokens=20))
        assert b.reservation_id is not None
        failed = store.settle(b.reservation_id, outcome="upstream_error")
        assert failed.body["tokens_charged"] == 0 and "UPSTREAM_ERROR" in failed.body["reasons"]
        u = store.usage("internal-compression", "alice", "run-1")
        assert u.tokens_today_project == 50 and u.records_run == 1
        # a stream cut midway charges what was used, and no record
        c = store.admit(SMALL, request(max_tokens=100, prompt_tokens=20))
        assert c.reservation_id is not None
        cut = store.settle(c.reservation_id, prompt_tokens=20, completion_tokens=7, outcome="client_disconnected")
        assert cut.body["tokens_charged"] == 27 and cut.body["records_charged"] == 0
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 77


def test_denied_requests_reserve_nothing_and_are_logged(store_db: str) -> None:
    with Store.open(store_db) as store:
        d = store.admit(SMALL, request(max_tokens=5000))
        assert not d.decision.allowed and d.reservation_id is None
        assert d.entry.body["decision"] == "deny" and d.entry.body["reasons"] == ["TOKENS_PER_DAY_EXCEEDED"]
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 0


def test_expired_reservations_are_reclaimed(store_db: str) -> None:
    with Store.open(store_db, reservation_ttl_s=0.0) as store:
        a = store.admit(SMALL, request(max_tokens=400))
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 405
        assert store.reclaim_expired() == 1
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 0
        assert store.reservation(a.reservation_id or "")["state"] == "expired"
        reclaim = list(store.entries(kind="reclaim"))
        assert reclaim[0].body["reasons"] == ["RESERVATION_EXPIRED"]


def test_days_are_utc_calendar_days(store_db: str) -> None:
    with Store.open(store_db) as store:
        store.admit(SMALL, request(max_tokens=95))
        today = utc_day()
        assert store.usage("internal-compression", "alice", "run-1", day=today).tokens_today_project == 100
        assert store.usage("internal-compression", "alice", "run-1", day="1999-12-31").tokens_today_project == 0


def test_thread_concurrency_never_exceeds_quota(store_db: str) -> None:
    granted: list[int] = []
    lock = threading.Lock()
    with Store.open(store_db) as store:
        def worker() -> None:
            for _ in range(20):
                a = store.admit(SMALL, request(max_tokens=25, prompt_tokens=0))
                if a.decision.allowed:
                    with lock:
                        granted.append(a.tokens_reserved)
        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(granted) <= 1000 and len(granted) == 40  # 40 x 25 fits exactly; records cap is 40 too
        allows = [e for e in store.entries(kind="decision") if e.body["decision"] == "allow"]
        assert len(allows) == len(granted) == len({e.body["reservation_id"] for e in allows})


def _hammer(db: str, n: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    store = Store.open(db)
    got = []
    try:
        for _ in range(n):
            a = store.admit(TOKENS_BIND, request(max_tokens=7, prompt_tokens=0))
            if a.decision.allowed:
                got.append((a.entry.index, a.tokens_reserved))
    finally:
        store.close()
    out.put(got)


def test_several_processes_share_one_database_exactly(replica_db: str) -> None:
    db = replica_db  # the child processes inherit $DISTILLGATE_SIGNING_KEY (PostgreSQL)
    Store.open(db).close()  # create schema and key once
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_hammer, args=(db, 80, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    grants = [g for r in results for g in r]
    # 320 concurrent attempts of 7 tokens against 1000 tokens/day: exactly floor(1000 / 7) = 142 grants
    assert sum(t for _, t in grants) <= 1000
    assert len(grants) == 142
    with Store.open(db) as store:
        allows = {e.index for e in store.entries(kind="decision") if e.body["decision"] == "allow"}
        assert allows == {i for i, _ in grants}, "every grant a caller saw is in the log, and only those"
        assert store.size() == 320
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 994
    from distillgate.ledger.verify import verify_db

    assert verify_db(db).ok


def test_early_admission_is_the_durable_one(tmp_path: Path) -> None:
    import asyncio
    import sqlite3

    async def go() -> None:
        with Store.open(tmp_path / "e.db") as store:
            adm, durable = await store.aadmit_early(SMALL, request(max_tokens=10))
            assert adm.decision.allowed and adm.reservation_id
            assert (await durable) == adm
            conn = sqlite3.connect(tmp_path / "e.db")
            stored = conn.execute("SELECT entry_hash FROM log WHERE idx=?", (adm.entry.index,)).fetchone()
            conn.close()
            assert stored == (adm.entry.entry_hash,)
            denied, durable2 = await store.aadmit_early(SMALL, request(project="moonshot"))
            assert not denied.decision.allowed and (await durable2).entry.index == adm.entry.index + 1

    asyncio.run(go())


def test_a_settlement_after_reclaim_still_charges_and_an_extended_lease_is_not_reclaimed(store_db: str) -> None:
    import asyncio
    import time

    with Store.open(store_db, reservation_ttl_s=60) as store:
        kept = store.admit(SMALL, request(max_tokens=100, prompt_tokens=20))
        lapsed = store.admit(SMALL, request(max_tokens=100, prompt_tokens=20))
        assert kept.reservation_id and lapsed.reservation_id
        store.reservation_ttl_s = 3600  # the renewal pushes `kept` an hour out
        assert asyncio.run(store.aextend([kept.reservation_id])) == 1
        assert store.reclaim_expired(now=time.time() + 600) == 1  # only `lapsed` expired
        assert store.reservation(kept.reservation_id)["state"] == "held"
        late = store.settle(lapsed.reservation_id, prompt_tokens=20, completion_tokens=10)
        assert late.body["settled_after_expiry"] and late.body["tokens_charged"] == 30
        # kept holds 120, lapsed was refunded by reclaim and then charged 30 by its late settlement
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 150
