"""The writer thread: jobs batched into one transaction (group commit), answered only after COMMIT.

Every write runs on one writer thread per ``Store``; callers hand it a job and wait for its future. The writer
drains whatever jobs are queued and runs them in one transaction, so concurrent callers share one commit (one
fsync). A failing job is undone on its own (ledger/txn.py); a failed transaction fails the whole batch and drops the
cache. Async callers are woken once per batch (one ``call_soon_threadsafe`` per event loop), not once per job.
A caller is told the outcome only after COMMIT returned: an acknowledged decision is durable.

One commit per request at low load: a transaction stays open up to ``lazy_commit_s`` while no caller needs its
commit yet, so that the next jobs share it (one BEGIN, one signed head, one fsync). Callers that do not need it yet
are a *lazy* job (a settlement committed after the answer went out) and an allowed admission handed out early
(``Job.hold``: its answer goes out as soon as it ran, its caller forwards the request and comes back with the
settlement, which then commits with it). Anything else ends the wait: a job whose caller waits for its commit, a
denial, the settlement of an admission of this transaction (its caller answers next), or a caller awaiting a
``Durable`` future (it tells the writer). Until COMMIT an early admission is only in this process: SIGKILL loses it
and the request it forwarded, never an answered one (nothing is answered before the gate, ``Durable``, resolves).

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
from typing import Any, TypeVar

import orjson

from distillgate.db import Conn
from distillgate.errors import InternalError, StoreUnavailable
from distillgate.ledger.backend import Backend
from distillgate.ledger.txn import Signs, State, Txn
from distillgate.ledger.witness import WitnessFile

COUNTER_CACHE_MAX = 100_000  # quota counters the writer keeps in memory between transactions
T = TypeVar("T")


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
    #: for a job answered early: given its result, the reservation whose settlement its caller brings next (None:
    #: its caller wants the commit now, as after a denial); the transaction may wait for that settlement
    hold: Callable[[Any], str | None] | None = None
    #: the reservation this job settles (it releases an admission of the same transaction that holds it)
    settles: str | None = None
    #: the caller awaits ``done`` (set by ``Durable``)
    awaited: bool = False


def _nothing(txn: Txn) -> None:
    return None


#: put on the queue by ``Writer.awaited``: look again whether a caller now waits for the open transaction
WAKE = Job(_nothing, None)


class Durable(asyncio.Future[T]):
    """The ``done`` future of a job answered early: awaiting it tells the writer that its caller now waits for the
    commit, which ends the open transaction's wait for company. (Waited on without ``await``, as by
    ``asyncio.wait``, it still resolves, at the latest ``lazy_commit_s`` after its job ran.)"""

    __slots__ = ("_job", "_writer")

    def __init__(self, writer: Writer, job: Job, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._writer: Writer | None = writer
        self._job = job

    def __await__(self) -> Any:
        writer = self._writer
        if writer is not None:
            self._writer = None
            writer.awaited(self._job)
        return super().__await__()

    __iter__ = __await__


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
    last_loop: asyncio.AbstractEventLoop | None = None  # the jobs of a batch mostly share one loop
    last: list[tuple[Any, bool, Any]] = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        fut = job.early if early else job.done
        if fut is None:
            continue
        loop = job.loop
        if loop is None:
            if not fut.done():
                ok, value = outcome
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
        elif loop is last_loop:
            last.append((fut, *outcome))
        else:
            last_loop = loop
            last = by_loop.get(loop) or by_loop.setdefault(loop, [])
            last.append((fut, *outcome))
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
        #: the writer holds a transaction open, waiting for company (see ``awaited``)
        self.waiting = False
        self._thread = threading.Thread(target=self._loop, name="distillgate-ledger-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.closed:
            raise InternalError("the store is closed")
        self.queue.put(job)

    def awaited(self, job: Job) -> None:
        """``job``'s caller now waits for its commit (any thread). Race-free with the wait: the writer sets
        ``waiting`` before it looks at ``awaited``, and this sets ``awaited`` before it looks at ``waiting``."""
        job.awaited = True
        if self.waiting:
            self.queue.put(WAKE)

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
            if first is WAKE:  # for a transaction that committed meanwhile
                continue
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
            if nxt is not WAKE:
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
        """Run ``batch`` in one transaction and commit it. While no job of it needs its commit yet (see the module
        docstring) the transaction stays open for up to ``lazy_commit_s``, running the jobs that arrive meanwhile,
        so they share its commit. Returns True when the store began closing meanwhile."""
        outcomes: list[tuple[bool, Any]] = []
        delivered = 0  # jobs whose early answer went out
        stop = False
        conn: Conn | None = None
        held: set[str] = set()  # reservations of early admissions whose settlement has not come yet
        try:
            try:
                conn = self._connection()
                txn = Txn(conn, self.store, self._begin(conn))
                urgent = self._run_jobs(txn, batch, outcomes, held)
                deliver(batch, outcomes, early=True)  # allowed admissions forward while the transaction is open
                delivered = len(batch)
                if not urgent:
                    self.waiting = True  # before looking at ``awaited`` (see ``awaited``)
                    try:
                        deadline = time.monotonic() + self.lazy_commit_s
                        urgent = any(job.awaited for job in batch)
                        while not urgent and len(batch) < self.batch_max:
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
                            if nxt is WAKE:
                                urgent = any(job.awaited for job in batch)
                                continue
                            more = [nxt]
                            stop = self._drain(more)
                            batch.extend(more)
                            urgent = self._run_jobs(txn, more, outcomes, held)
                            deliver(more, outcomes[delivered:], early=True)
                            delivered = len(batch)
                            if stop:
                                break
                    finally:
                        self.waiting = False
                txn.finish()
                version = self.backend.end_write(conn, txn.state.version)
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
            deliver(batch, failed, early=False)  # early answers too: their callers answer 503, nothing else
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
    def _run_jobs(txn: Txn, jobs: list[Job], outcomes: list[tuple[bool, Any]], held: set[str]) -> bool:
        """Run ``jobs`` in ``txn`` (a failing one is undone alone); True when one of them ends the wait for company:
        its caller wants the commit now, or it settles an admission of this transaction (whose caller answers
        next)."""
        urgent = False
        for job in jobs:
            if job.settles is not None and job.settles in held:
                held.discard(job.settles)
                urgent = True
            mark = txn.mark()
            try:
                value = job.fn(txn)
            except Exception as exc:
                txn.undo(mark)
                outcomes.append((False, exc))
                urgent = urgent or not job.lazy
                continue
            outcomes.append((True, value))
            if job.lazy:
                continue
            reservation = None if job.hold is None else job.hold(value)
            if reservation is None:
                urgent = True
            else:
                held.add(reservation)
        return urgent
