"""The store's writer: jobs batched into one transaction, a cached chain head and quota counters, buffered rows.

These tests pin what the cache must never change: a failing job leaves no trace, another writer on the same file
is seen before the next decision, and a failed commit forgets everything the batch had changed in memory.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from distillgate.errors import NotFoundError
from distillgate.ledger import Store
from distillgate.ledger.store import _Job, _Txn, utc_day
from distillgate.ledger.verify import verify_db
from distillgate.policy import policy_from_data

from _foundation_support import SEED, request

QUOTA = policy_from_data({**SEED, "quotas": {"tokens_per_day": 1000, "records_per_run": 5000}})


def _hold_write_lock(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_a_failing_job_in_a_batch_leaves_no_trace(tmp_path: Path) -> None:
    db = tmp_path / "b.db"

    def half_done_then_fails(txn: _Txn) -> Any:
        txn.apply("internal-compression", "alice", "run-1", utc_day(txn.now), 500, 3)
        txn.add_reservation("ghost", txn.next_index, "internal-compression", "alice", "run-1", utc_day(txn.now),
                            500, 3)
        txn.append("decision", {"user": "alice", "project": "internal-compression", "note": "never committed"})
        raise RuntimeError("the job broke after changing things")

    async def go(store: Store) -> list[Any]:
        blocker = _hold_write_lock(db)  # the writer waits for the lock on the first job: the rest queue up
        first = asyncio.ensure_future(store.aadmit(QUOTA, request(max_tokens=10, prompt_tokens=0)))
        await asyncio.sleep(0.2)
        broken: Future[Any] = Future()
        store._submit(_Job(half_done_then_fails, broken))
        rest = [asyncio.ensure_future(store.aadmit(QUOTA, request(max_tokens=20, prompt_tokens=0))),
                asyncio.ensure_future(store.asettle("no-such-reservation")),
                asyncio.ensure_future(store.aadmit(QUOTA, request(max_tokens=30, prompt_tokens=0)))]
        await asyncio.sleep(0.2)
        blocker.execute("COMMIT")
        blocker.close()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        with pytest.raises(RuntimeError, match="broke"):
            broken.result(timeout=10)
        return out

    with Store.open(db) as store:
        adm0, adm1, missing, adm2 = asyncio.run(go(store))
        assert isinstance(missing, NotFoundError)
        assert [adm0.entry.index, adm1.entry.index, adm2.entry.index] == [0, 1, 2]
        assert adm2.entry.body["prev_hash"] == adm1.entry.entry_hash
        assert adm2.entry.body["usage_before"]["tokens_today_project"] == 30  # 10 + 20, not the broken 500
        usage = store.usage("internal-compression", "alice", "run-1")
        assert usage.tokens_today_project == 60 and usage.tokens_today_user == 60 and usage.records_run == 3
        with pytest.raises(NotFoundError):
            store.reservation("ghost")
        assert store.size() == 3 and all(e.body.get("note") is None for e in store.entries())
    assert verify_db(db).ok


def test_a_failing_job_undoes_every_counter_change_it_made_even_on_keys_new_to_the_batch(tmp_path: Path) -> None:
    """``apply`` undoes by subtracting what it added (no copies): a job that charged the same counters twice, some
    of them first touched by this job, then failed, leaves the cache and the table as if it never ran."""
    db = tmp_path / "u.db"

    def charges_twice_then_fails(txn: _Txn) -> Any:
        day = utc_day(txn.now)
        txn.apply("internal-compression", "mallory", "run-m", day, 400, 2)
        txn.apply("internal-compression", "mallory", "run-m", day, 7, 1)
        txn.apply("internal-compression", "alice", "run-1", day, -3, 0)
        raise RuntimeError("broke after charging")

    async def go(store: Store) -> tuple[Any, Any]:
        blocker = _hold_write_lock(db)  # all three jobs share one batch
        first = asyncio.ensure_future(store.aadmit(QUOTA, request(max_tokens=10, prompt_tokens=0)))
        await asyncio.sleep(0.2)
        broken: Future[Any] = Future()
        store._submit(_Job(charges_twice_then_fails, broken))
        after = asyncio.ensure_future(store.aadmit(QUOTA, request(user="mallory", run="run-m", max_tokens=20,
                                                                  prompt_tokens=0)))
        await asyncio.sleep(0.2)
        blocker.execute("COMMIT")
        blocker.close()
        out = await asyncio.gather(first, after)
        with pytest.raises(RuntimeError, match="broke"):
            broken.result(timeout=10)
        return out[0], out[1]

    with Store.open(db) as store:
        _, adm = asyncio.run(go(store))
        assert adm.entry.body["usage_before"] == {"tokens_today_project": 10, "tokens_today_user": 0,
                                                  "records_run": 0}
        assert store.usage("internal-compression", "mallory", "run-m").tokens_today_user == 20
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_user == 10
    conn = sqlite3.connect(db)
    rows = dict(((sc, k), (t, r)) for sc, k, _, t, r in conn.execute("SELECT * FROM counters"))
    conn.close()
    assert rows[("user", "mallory")] == (20, 0) and rows[("user", "alice")] == (10, 0)
    assert rows[("project", "internal-compression")] == (30, 0)
    assert verify_db(db).ok


def test_another_writer_on_the_same_file_is_seen_before_the_next_decision(tmp_path: Path) -> None:
    db = tmp_path / "two.db"
    Store.open(db).close()
    with Store.open(db) as one, Store.open(db) as two:
        granted = 0
        for i in range(160):  # alternate writers: each must see the other's counters and chain head
            store = one if i % 2 else two
            adm = store.admit(QUOTA, request(max_tokens=7, prompt_tokens=0))
            assert adm.entry.index == i
            assert adm.entry.body["usage_before"]["tokens_today_project"] == granted * 7
            granted += adm.decision.allowed
        assert granted == 142  # floor(1000 / 7): exact across both
        last = two.admit(QUOTA, request(max_tokens=7, prompt_tokens=0))
        settled = one.settle(one.entries(kind="decision").__next__().body["reservation_id"], prompt_tokens=0,
                             completion_tokens=2)
        assert settled.body["tokens_refunded"] == 5 and not last.decision.allowed
        assert two.usage("internal-compression", "alice", "run-1").tokens_today_project == 142 * 7 - 5
    assert verify_db(db).ok


def test_a_failed_commit_forgets_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "f.db"
    real_finish = _Txn.finish
    calls = {"n": 0}

    def finish_fails_once(self: _Txn) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        real_finish(self)

    monkeypatch.setattr(_Txn, "finish", finish_fails_once)
    with Store.open(db) as store:
        ok = store.admit(QUOTA, request(max_tokens=100, prompt_tokens=0))
        with pytest.raises(sqlite3.OperationalError, match="simulated"):
            store.admit(QUOTA, request(max_tokens=200, prompt_tokens=0))
        after = store.admit(QUOTA, request(max_tokens=300, prompt_tokens=0))
        assert after.entry.index == ok.entry.index + 1 and after.entry.body["prev_hash"] == ok.entry.entry_hash
        assert after.entry.body["usage_before"]["tokens_today_project"] == 100  # the failed 200 left no trace
        with pytest.raises(NotFoundError):
            store.settle(ok.reservation_id + "-unknown")
        store.settle(ok.reservation_id, prompt_tokens=0, completion_tokens=40)
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 340
    assert verify_db(db).ok


def test_reclaim_skips_what_the_same_batch_already_settled(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with Store.open(db, reservation_ttl_s=0.05) as store:
        adm = store.admit(QUOTA, request(max_tokens=50, prompt_tokens=0))
        stale = store.admit(QUOTA, request(max_tokens=70, prompt_tokens=0))
        time.sleep(0.1)

        async def go() -> tuple[Any, int]:
            blocker = _hold_write_lock(db)
            event = asyncio.ensure_future(store.aappend_event("note", {"text": "hold the writer"}))
            await asyncio.sleep(0.2)
            settle = asyncio.ensure_future(store.asettle(adm.reservation_id, prompt_tokens=0, completion_tokens=5))
            reclaim = asyncio.ensure_future(store.areclaim_expired())  # same batch: must not expire `adm` again
            await asyncio.sleep(0.2)
            blocker.execute("COMMIT")
            blocker.close()
            await event
            return await settle, await reclaim

        settled, reclaimed = asyncio.run(go())
        assert settled.body["tokens_charged"] == 5 and reclaimed == 1
        assert store.reservation(adm.reservation_id)["state"] == "settled"
        assert store.reservation(stale.reservation_id)["state"] == "expired"
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 5
    assert verify_db(db).ok


def test_a_lazy_settlement_shares_the_next_decisions_commit(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    commits = _counting_commits(monkeypatch)

    async def go(store: Store) -> None:
        first = await store.aadmit(QUOTA, request(max_tokens=10, prompt_tokens=0))
        commits.clear()
        settle = asyncio.ensure_future(store.asettle(first.reservation_id, prompt_tokens=0, completion_tokens=4,
                                                     lazy=True))
        await asyncio.sleep(0.3)
        assert not settle.done(), "a lazy settlement waits for company (up to lazy_commit_s)"
        second = await store.aadmit(QUOTA, request(max_tokens=10, prompt_tokens=0))
        entry = await asyncio.wait_for(settle, 5)
        assert commits == [2], "one transaction, one commit: the settlement and the next decision"
        assert second.entry.index == entry.index + 1

    with Store.open(tmp_path / "lazy.db", lazy_commit_s=30.0) as store:
        asyncio.run(go(store))
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 14
    assert verify_db(tmp_path / "lazy.db").ok


def test_a_lazy_settlement_alone_commits_after_lazy_commit_s_or_at_close(tmp_path: Path) -> None:
    db = tmp_path / "alone.db"

    async def settle_lazily(store: Store, wait: float) -> float:
        adm = await store.aadmit(QUOTA, request(max_tokens=10, prompt_tokens=0))
        started = time.monotonic()
        task = asyncio.ensure_future(store.asettle(adm.reservation_id, prompt_tokens=0, completion_tokens=3,
                                                   lazy=True))
        done, _ = await asyncio.wait({task}, timeout=wait)
        return time.monotonic() - started if done else -1.0

    with Store.open(db, lazy_commit_s=0.05) as store:
        took = asyncio.run(settle_lazily(store, 5.0))
        assert 0.04 <= took < 2.0
    with Store.open(db, lazy_commit_s=60.0) as store:
        assert asyncio.run(settle_lazily(store, 0.2)) == -1.0  # still waiting for company when we close
    with Store.open(db) as store:  # closing committed it
        assert [e.body["tokens_charged"] for e in store.entries(kind="settlement")] == [3, 3]
    assert verify_db(db).ok


def test_the_counter_cache_is_bounded_and_reloads_what_it_dropped(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from distillgate.ledger import writer as store_module

    monkeypatch.setattr(store_module, "COUNTER_CACHE_MAX", 4)
    with Store.open(tmp_path / "bounded.db") as store:
        for i in range(12):  # every run adds a counter key: the cache overflows and is dropped several times
            store.admit(QUOTA, request(run=f"run-{i % 6}", max_tokens=10, prompt_tokens=0))
            assert store._state is not None and len(store._state.counters) <= 4 + 3
        last = store.admit(QUOTA, request(run="run-0", max_tokens=10, prompt_tokens=0))
        assert last.entry.body["usage_before"]["tokens_today_project"] == 120  # reloaded from the table
        assert store.usage("internal-compression", "alice", "run-0").records_run == 3


# -- one commit per request: an early admission's transaction waits for its settlement ------------------------------
def _counting_commits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The entries each transaction wrote, one item per commit."""
    commits: list[int] = []
    real_finish = _Txn.finish

    def counting_finish(self: _Txn) -> None:
        commits.append(self.appended)
        real_finish(self)

    monkeypatch.setattr(_Txn, "finish", counting_finish)
    return commits


def _committed(db: str, index: int) -> bool:
    """Whether log entry ``index`` is committed, as another connection sees it."""
    from distillgate.db import connect

    conn = connect(db)
    try:
        return conn.execute("SELECT idx FROM log WHERE idx=?", (index,)).fetchone() is not None
    finally:
        conn.close()


@pytest.mark.parametrize("lazy", [False, True], ids=["before_reply", "after_reply"])
def test_an_early_admission_and_its_settlement_share_one_commit(store_db: str, monkeypatch: pytest.MonkeyPatch,
                                                                 lazy: bool) -> None:
    commits = _counting_commits(monkeypatch)

    async def go(store: Store) -> None:
        adm, durable = await store.aadmit_early(QUOTA, request(max_tokens=10, prompt_tokens=0))
        assert adm.decision.allowed
        await asyncio.sleep(0.2)
        assert not durable.done() and not _committed(store_db, adm.entry.index), "held for its settlement"
        settled = store.submit_settle(adm.reservation_id, prompt_tokens=0, completion_tokens=4, lazy=lazy)
        # the settlement ends the wait (lazy_commit_s is 30 s): nobody awaits anything yet
        done, _ = await asyncio.wait({durable, settled}, timeout=5)
        assert done == {durable, settled}
        assert commits == [2], "one BEGIN, one signed head, one fsync for the request"
        assert (await settled).index == adm.entry.index + 1

    with Store.open(store_db, lazy_commit_s=30.0) as store:
        asyncio.run(go(store))
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 4
        head = store.head()
        assert head is not None and head.tree_size == 2
    if not store_db.startswith("postgres"):
        assert verify_db(Path(store_db)).ok


def test_awaiting_an_early_admission_ends_the_wait_and_a_denial_never_waits(store_db: str) -> None:
    async def go(store: Store) -> tuple[float, float]:
        adm, durable = await store.aadmit_early(QUOTA, request(max_tokens=10, prompt_tokens=0))
        await asyncio.sleep(0.2)
        assert not durable.done()

        async def awaiting() -> Any:
            return await durable  # ``await`` tells the writer

        started = time.monotonic()
        assert (await asyncio.wait_for(awaiting(), 5)) == adm
        took_awaited = time.monotonic() - started
        assert _committed(store_db, adm.entry.index)
        denied, durable2 = await store.aadmit_early(QUOTA, request(project="moonshot"))
        assert not denied.decision.allowed
        started = time.monotonic()
        done, _ = await asyncio.wait({durable2}, timeout=5)  # not awaited: the denial alone ends the wait
        assert done == {durable2}
        return took_awaited, time.monotonic() - started

    with Store.open(store_db, lazy_commit_s=30.0) as store:
        took_awaited, took_denied = asyncio.run(go(store))
    assert took_awaited < 5 and took_denied < 5


def test_an_early_admission_alone_commits_after_lazy_commit_s(store_db: str) -> None:
    async def go(store: Store) -> float:
        adm, durable = await store.aadmit_early(QUOTA, request(max_tokens=10, prompt_tokens=0))
        started = time.monotonic()
        done, _ = await asyncio.wait({durable}, timeout=5)  # nobody awaits it, no settlement comes
        assert done == {durable} and _committed(store_db, adm.entry.index)
        return time.monotonic() - started

    with Store.open(store_db, lazy_commit_s=0.1) as store:
        took = asyncio.run(go(store))
    assert 0.05 <= took < 2.0


def test_no_future_resolves_before_its_commit(store_db: str) -> None:
    """Early admissions, settlements (lazy or not) and plain admissions from many tasks at once: when any ``done``
    or ``durable`` future resolves, its entry is committed (read by another connection)."""
    seen: list[tuple[int, bool]] = []

    def check(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            value = fut.result()
            index = value.entry.index if hasattr(value, "entry") else value.index
            seen.append((index, _committed(store_db, index)))

    async def client(store: Store, i: int) -> None:
        for j in range(6):
            if (i + j) % 3 == 0:
                fut = asyncio.ensure_future(store.aadmit(QUOTA, request(max_tokens=1, prompt_tokens=0)))
                fut.add_done_callback(check)
                adm = await fut
            else:
                adm, durable = await store.aadmit_early(QUOTA, request(max_tokens=1, prompt_tokens=0))
                durable.add_done_callback(check)
                await asyncio.sleep(0.001 * (j % 2))  # "forwarding"
            assert adm.reservation_id is not None
            settled = store.submit_settle(adm.reservation_id, prompt_tokens=0, completion_tokens=1,
                                          lazy=bool(j % 2))
            settled.add_done_callback(check)
            if j % 2 == 0:
                await settled
            if (i + j) % 3:
                await durable

    async def go(store: Store) -> None:
        await asyncio.gather(*[client(store, i) for i in range(8)])
        await asyncio.sleep(0.1)  # the last lazy settlements

    with Store.open(store_db, lazy_commit_s=0.02) as store:
        asyncio.run(go(store))
    assert len(seen) == 8 * 6 * 2 and all(ok for _, ok in seen), [s for s in seen if not s[1]]


def test_a_failed_commit_fails_early_answered_jobs_too(store_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_finish = _Txn.finish
    failing = {"on": False}

    def finish_fails(self: _Txn) -> None:
        if failing["on"]:
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        real_finish(self)

    monkeypatch.setattr(_Txn, "finish", finish_fails)

    async def go(store: Store) -> None:
        ok = await store.aadmit(QUOTA, request(max_tokens=100, prompt_tokens=0))
        failing["on"] = True
        adm, durable = await store.aadmit_early(QUOTA, request(max_tokens=200, prompt_tokens=0))
        assert adm.decision.allowed  # answered early: the caller forwarded the request
        settled = store.submit_settle(adm.reservation_id, prompt_tokens=0, completion_tokens=50)
        with pytest.raises(sqlite3.OperationalError, match="simulated"):
            await durable  # the gateway's gate: it answers 503
        with pytest.raises(sqlite3.OperationalError, match="simulated"):
            await settled
        assert store._state is None, "the cache ran ahead of the log: dropped"
        failing["on"] = False
        after = await store.aadmit(QUOTA, request(max_tokens=300, prompt_tokens=0))
        assert after.entry.index == ok.entry.index + 1 and after.entry.body["prev_hash"] == ok.entry.entry_hash
        assert after.entry.body["usage_before"]["tokens_today_project"] == 100  # the failed 200 left no trace
        with pytest.raises(NotFoundError):
            store.reservation(adm.reservation_id)

    with Store.open(store_db, lazy_commit_s=30.0) as store:
        asyncio.run(go(store))
        assert store.size() == 2
    if not store_db.startswith("postgres"):
        assert verify_db(Path(store_db)).ok


def test_an_open_early_admission_holds_other_writers_at_most_lazy_commit_s(store_db: str) -> None:
    """Another process's writer (here another store on the same database) waits for the held transaction at most
    ``lazy_commit_s`` (plus the commit itself), and quotas stay exact across both."""
    import threading

    lazy = 0.3
    with Store.open(store_db, lazy_commit_s=lazy) as one, Store.open(store_db) as two:
        two.admit(QUOTA, request(max_tokens=1, prompt_tokens=0))  # both open and migrated
        waited: list[float] = []

        def other_writer() -> None:
            started = time.monotonic()
            two.admit(QUOTA, request(max_tokens=7, prompt_tokens=0))
            waited.append(time.monotonic() - started)

        async def go() -> float:
            _, durable = await one.aadmit_early(QUOTA, request(max_tokens=10, prompt_tokens=0))
            started = time.monotonic()
            thread = threading.Thread(target=other_writer)
            thread.start()
            done, _ = await asyncio.wait({durable}, timeout=5)
            assert done == {durable}
            held = time.monotonic() - started
            await asyncio.to_thread(thread.join, 10)
            return held

        held = asyncio.run(go())
        assert lazy * 0.5 <= held < lazy + 1.0
        assert len(waited) == 1 and lazy * 0.5 <= waited[0] < lazy + 1.0, waited
        assert one.usage("internal-compression", "alice", "run-1").tokens_today_project == 18


def test_a_reservation_made_and_settled_in_one_transaction_is_one_row_and_a_failed_settlement_undoes(
        store_db: str) -> None:
    """The reservation's INSERT carries the settlement's outcome when both are in one transaction (no UPDATE); a
    settlement that fails after closing it puts the row back as held, and the next one closes it."""

    def closes_then_fails(rid: str) -> Any:
        def job(txn: _Txn) -> Any:
            txn.close_reservation(rid, "settled", 1, 1)
            raise RuntimeError("broke after closing")

        return job

    async def go(store: Store) -> tuple[Any, Any, Any]:
        adm, durable = await store.aadmit_early(QUOTA, request(max_tokens=10, prompt_tokens=0))
        broken: Future[Any] = Future()
        store._submit(_Job(closes_then_fails(adm.reservation_id), broken, lazy=True))
        settled = await store.asettle(adm.reservation_id, prompt_tokens=0, completion_tokens=4)
        assert (await durable) == adm and settled.index == adm.entry.index + 1
        with pytest.raises(RuntimeError, match="broke"):
            broken.result(timeout=10)
        held, held_durable = await store.aadmit_early(QUOTA, request(max_tokens=20, prompt_tokens=0))
        await held_durable
        return adm, settled, held

    with Store.open(store_db, lazy_commit_s=30.0) as store:
        adm, settled, held = asyncio.run(go(store))
        row = store.reservation(adm.reservation_id)
        assert (row["state"], row["tokens_reserved"], row["tokens_charged"], row["records_charged"]) == \
            ("settled", 10, 4, 1)
        assert settled.body["tokens_charged"] == 4
        row = store.reservation(held.reservation_id)
        assert (row["state"], row["tokens_charged"], row["records_charged"]) == ("held", None, None)
        assert store.usage("internal-compression", "alice", "run-1").tokens_today_project == 24
