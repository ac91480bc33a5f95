"""The writer thread: jobs batched into one transaction (group commit), answered only after COMMIT.

Every write runs on one writer thread per ``Store``; callers hand it a job and wait for its future. The writer
drains whatever jobs are queued and runs them in one transaction, so concurrent callers share one commit (one
fsync). A failing job is undone on its own (ledger/txn.py); a failed transaction fails the whole batch and drops the
cache. Async callers are woken once per batch (one ``call_soon_threadsafe`` per event loop), not once per job.
A caller is told the outcome only after COMMIT returned: an acknowledged decision is durable.

The write lock and the cache's validity come from the backend (ledger/backend.py). A connection the server dropped
(PostgreSQL restarted) fails its batch (the gateway answers 503: nothing decided) and is replaced before the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from distillgate.db import Conn
from distillgate.errors import InternalError, StoreUnavailable
from distillgate.ledger.backend import Backend
from distillgate.ledger.txn import Signs, State, Txn
from distillgate.ledger.witness import WitnessFile

COUNTER_CACHE_MAX = 100_000  # quota counters the writer keeps in memory between transactions


@dataclass(slots=True)
class Job:
    fn: Callable[[Txn], Any]
    #: resolved after COMMIT: a concurrent Future for threads, an asyncio Future (with ``loop``) for coroutines
    done: Any
    #: resolved as soon as the job ran, before COMMIT (optional)
    early: Any = None
    loop: asyncio.AbstractEventLoop | None = None
    #: nobody waits for this job's commit: it may wait for the next job to share one (``lazy_commit_s``)
    lazy: bool = False


def _resolve(items: list[tuple[Any, bool, Any]]) -> None:
    """Set results on futures of one event loop (runs in that loop: one wake-up per batch, not one per job)."""
    for fut, ok, value in items:
        if fut.done():  # the awaiting task was cancelled
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def deliver(jobs: list[Job], outcomes: list[tuple[bool, Any]], early: bool) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, bool, Any]]] = {}
    for job, (ok, value) in zip(jobs, outcomes, strict=True):
        fut = job.early if early else job.done
        if fut is None:
            continue
        if job.loop is None:
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
        else:
            by_loop.setdefault(job.loop, []).append((fut, ok, value))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop was closed: nobody is waiting
            loop.call_soon_threadsafe(_resolve, items)


class Writer:
    def __init__(self, backend: Backend, conn: Conn, store: Signs, witness: WitnessFile | None, *,
                 batch_max: int, lazy_commit_s: float) -> None:
        self.backend = backend
        self.conn: Conn | None = conn
        self.store = store
        self.witness = witness
        self.batch_max = batch_max
        self.lazy_commit_s = lazy_commit_s
        self.queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.state: State | None = None  # the cache; see ledger/txn.py
        self.closed = False
        self._thread = threading.Thread(target=self._loop, name="distillgate-ledger-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.closed:
            raise InternalError("the store is closed")
        self.queue.put(job)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                break
            batch: list[Job] = [first]
            stop = self._drain(batch)
            if self._run_batch(batch) or stop:
                break
        if self.conn is not None:
            self.conn.close()

    def _drain(self, batch: list[Job]) -> bool:
        """Add the jobs already queued (up to ``batch_max``); True when the store is closing."""
        while len(batch) < self.batch_max:
            try:
                nxt = self.queue.get_nowait()
            except queue.Empty:
                return False
            if nxt is None:
                return True
            batch.append(nxt)
        return False

    def _connection(self) -> Conn:
        conn = self.conn
        if conn is None or conn.broken:
            self.conn = None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = self.conn = self.backend.connect()  # raises StoreUnavailable while the server is down
        return conn

    def _begin(self, conn: Conn) -> State:
        """The write transaction, then the cached state, reloaded if anyone else committed since."""
        version = self.backend.begin_write(conn)
        state = self.state
        if state is None or state.version != version:
            state = self.state = State(conn, version, self.store.signer)
        elif len(state.counters) > COUNTER_CACHE_MAX:  # a long-lived gateway sees many runs and days: start afresh
            state.counters.clear()
        return state

    def _run_batch(self, batch: list[Job]) -> bool:
        with self.backend.write_lock():
            return self._run_batch_locked(batch)

    def _run_batch_locked(self, batch: list[Job]) -> bool:
        """Run ``batch`` in one transaction and commit it. A batch of lazy jobs only (settlements nobody waits for)
        keeps its transaction open for up to ``lazy_commit_s`` to share its commit with the next job that arrives.
        Returns True when the store began closing meanwhile."""
        outcomes: list[tuple[bool, Any]] = []
        delivered = 0  # jobs whose early answer went out
        stop = False
        conn: Conn | None = None
        try:
            try:
                conn = self._connection()
                txn = Txn(conn, self.store, self._begin(conn))
                self._run_jobs(txn, batch, outcomes)
                deadline = time.monotonic() + self.lazy_commit_s
                while all(job.lazy for job in batch) and len(batch) < self.batch_max:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        nxt = self.queue.get(timeout=wait)
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    more = [nxt]
                    stop = self._drain(more)
                    batch.extend(more)
                    self._run_jobs(txn, more, outcomes)
                    if stop:
                        break
                # Rows and the signed head are written first, so that once the early answers are out this thread
                # goes straight into COMMIT (the fsync, without the GIL) while the callers forward their requests.
                txn.finish()
                version = self.backend.end_write(conn, txn.state.version)
                deliver(batch, outcomes, early=True)
                delivered = len(batch)
                conn.execute("COMMIT")
                txn.state.version = version
                self._witness_commit(txn)
            except BaseException:
                self.state = None  # the cache ran ahead of what is committed
                if conn is not None:
                    conn.rollback_quietly()
                raise
        except Exception as exc:  # the transaction failed: nobody's work is durable
            failure: Exception = exc
            if conn is not None and conn.broken:
                failure = StoreUnavailable(f"lost the connection to {self.backend.label}: {str(exc).strip()}",
                                           hint="is the database up? the next write reconnects")
                failure.__cause__ = exc
            failed = [(False, failure)] * len(batch)
            deliver(batch[delivered:], failed[delivered:], early=True)
            deliver(batch, failed, early=False)
            return stop
        deliver(batch, outcomes, early=False)
        return stop

    def _witness_commit(self, txn: Txn) -> None:
        """Append the heads this commit signed to the witness file (see ledger/witness.py)."""
        if self.witness is None:
            return
        heads = [orjson.dumps(cp.as_dict()) for cp in txn.checkpoints]
        if txn.head is not None:
            heads.append(txn.head_json)
        self.witness.append(heads, sync=bool(txn.checkpoints))

    @staticmethod
    def _run_jobs(txn: Txn, jobs: list[Job], outcomes: list[tuple[bool, Any]]) -> None:
        for job in jobs:
            mark = txn.mark()
            try:
                outcomes.append((True, job.fn(txn)))
            except Exception as exc:
                txn.undo(mark)
                outcomes.append((False, exc))
