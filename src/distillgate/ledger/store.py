"""The ``Store``: quota ledger and decision log in one SQLite database (WAL, fsync on every commit).

Why one database: a decision, the quota reservation it makes and its log entry commit in *one* transaction, so a
crash can never leave a reservation without its decision or a logged grant without its reservation.

Concurrency model
-----------------
* Every write runs on one writer thread per ``Store``; callers hand it a job and wait for its future. The writer
  drains whatever jobs are queued and runs them in one ``BEGIN IMMEDIATE`` transaction, so concurrent callers share
  one commit (one fsync: group commit). Jobs run against an in-memory ``_State`` (chain head, Merkle frontier,
  quota counters, held reservations) and buffer their rows; the batch writes them with one ``executemany`` per
  table before COMMIT. A failing job is undone on its own (its rows and cache changes), others are unaffected.
  Async callers are woken once per batch (one ``call_soon_threadsafe`` per event loop), not once per job.
* Several processes may open the same file. ``BEGIN IMMEDIATE`` takes SQLite's write lock; inside it the writer
  compares ``PRAGMA data_version`` with the one its cache was built under and reloads the cache if any other
  connection committed in between. So quotas stay exact and the hash chain stays linear across processes, and a
  single process pays no reads for them. A failed transaction drops the cache.
* A caller is told the outcome only after COMMIT returned (``synchronous=FULL``): an acknowledged decision is
  durable.

Quotas are reservation-based: ``admit`` reserves ``prompt_tokens + max_tokens * n`` tokens and ``n`` records,
``settle`` replaces the reservation by what was used (or refunds it), and ``reclaim_expired`` refunds reservations
whose request died without settling. Days are UTC calendar days.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from distillgate.canonical import canonical_json, sha256_hex
from distillgate.errors import IntegrityError, InternalError, NotFoundError, UserError
from distillgate.ledger.entries import bound_denial, columns
from distillgate.ledger.merkle import Frontier
from distillgate.ledger.signing import Signer, default_key_path
from distillgate.ledger.witness import WitnessFile, default_witness_path
from distillgate.policy.decision import Decision, Request, Usage, decide
from distillgate.policy.model import Policy, PolicySet

SCHEMA_VERSION = 1
COUNTER_CACHE_MAX = 100_000  # quota counters the writer keeps in memory between transactions
GENESIS_HASH = "0" * 64
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    idx INTEGER PRIMARY KEY,
    entry_hash TEXT NOT NULL,
    body BLOB NOT NULL,
    kind TEXT NOT NULL,
    ts TEXT NOT NULL,
    run TEXT,
    project TEXT,
    user TEXT
);
CREATE INDEX IF NOT EXISTS log_run ON log(run);
CREATE INDEX IF NOT EXISTS log_body_run ON log(json_extract(CAST(body AS TEXT), '$.run'));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    tree_size INTEGER PRIMARY KEY,
    root_hash TEXT NOT NULL,
    ts TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    day TEXT NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0,
    records INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, key, day)
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    decision_index INTEGER NOT NULL,
    project TEXT, user TEXT, run TEXT, day TEXT NOT NULL,
    tokens_reserved INTEGER NOT NULL,
    records_reserved INTEGER NOT NULL,
    tokens_charged INTEGER,
    records_charged INTEGER,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_held ON reservations(state, expires);
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    decision_index INTEGER NOT NULL
);
"""


def utc_now() -> datetime:
    return datetime.now(UTC)


def utc_day(now: datetime | None = None) -> str:
    return (now or utc_now()).strftime("%Y-%m-%d")


def iso(now: datetime) -> str:
    return now.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class LogEntry:
    index: int
    entry_hash: str
    body: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {**self.body, "entry_hash": self.entry_hash}


@dataclass(frozen=True)
class Admission:
    decision: Decision
    entry: LogEntry
    reservation_id: str | None
    tokens_reserved: int
    records_reserved: int


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    root_hash: str
    ts: str
    key_id: str
    signature: str

    def payload(self) -> dict[str, Any]:
        return {"tree_size": self.tree_size, "root_hash": self.root_hash, "ts": self.ts, "key_id": self.key_id}

    def as_dict(self) -> dict[str, Any]:
        return {**self.payload(), "signature": self.signature}


_MISSING = object()
CounterKey = tuple[str, str, str]  # (scope, key, day) of a row of the counters table


def _run_key(project: str | None, run: str | None) -> CounterKey:
    return ("run", f"{project}\x1f{run}", "")


def _usage_keys(project: str | None, user: str | None, run: str | None, day: str) -> list[CounterKey]:
    """The counters ``decide`` reads: the project's and the user's tokens today, the run's records."""
    return [("project", project or "", day), ("user", user or "", day), _run_key(project, run)]


def _read_counters(conn: sqlite3.Connection, keys: Sequence[CounterKey]) -> dict[CounterKey, list[int]]:
    """[tokens, records] of each key as committed ([0, 0] for a key with no row)."""
    found = {(sc, k, d): [int(t), int(r)] for sc, k, d, t, r in conn.execute(
        "SELECT scope, key, day, tokens, records FROM counters WHERE (scope, key, day) IN ("
        + ",".join("(?,?,?)" for _ in keys) + ")", [v for key in keys for v in key])}
    return {k: found.get(k, [0, 0]) for k in keys}


def _usage(counters: Sequence[list[int]]) -> Usage:
    project, user, run = counters
    return Usage(tokens_today_project=project[0], tokens_today_user=user[0], records_run=run[1])


class _State:
    """What the writer knows between transactions: chain head, Merkle frontier, quota counters, reservations.

    Valid only while no other connection has committed to the file (``PRAGMA data_version`` unchanged); the writer
    reloads it inside the write lock when another process (or a key/account table) wrote in between.
    """

    def __init__(self, conn: sqlite3.Connection, data_version: int) -> None:
        row = conn.execute("SELECT idx, entry_hash FROM log ORDER BY idx DESC LIMIT 1").fetchone()
        self.next_index = 0 if row is None else int(row[0]) + 1
        self.prev_hash = GENESIS_HASH if row is None else str(row[1])
        fr = conn.execute("SELECT value FROM meta WHERE key='frontier'").fetchone()
        self.frontier = Frontier.from_json(orjson.loads(fr[0])) if fr else Frontier()
        if self.frontier.size != self.next_index:
            raise InternalError(
                f"Merkle frontier size {self.frontier.size} != log size {self.next_index}",
                hint="the database was modified outside distillgate; run `distillgate audit verify`",
            )
        self.data_version = data_version
        #: (scope, key, day) -> [tokens, records], as committed plus this transaction's changes
        self.counters: dict[CounterKey, list[int]] = {}
        #: reservation id -> (project, user, run, day, tokens_reserved, records_reserved, state, decision_index)
        self.reservations: dict[str, tuple[Any, ...]] = {}
        #: run id -> the project that owns it (None: nobody yet), as committed plus this transaction's claims
        self.runs: dict[str, str | None] = {}


class _Txn:
    """One write transaction. Jobs read and change the cached ``_State``; their rows are buffered and written with
    one ``executemany`` per table in ``finish`` (the same transaction, so still all-or-nothing). Each job can be
    undone on its own (``mark``/``undo``): a failing job leaves no row and no trace in the caches."""

    def __init__(self, conn: sqlite3.Connection, store: Store, state: _State) -> None:
        self.conn = conn
        self.store = store
        self.state = state
        self.now = utc_now()
        self.appended = 0
        self.head: Checkpoint | None = None  # the signed head ``finish`` wrote (for the witness)
        self._log: list[tuple[Any, ...]] = []
        self._runs: list[tuple[Any, ...]] = []
        self._checkpoints: list[tuple[Any, ...]] = []
        self._new_reservations: list[tuple[Any, ...]] = []
        self._reservation_updates: list[tuple[Any, ...]] = []
        self._deltas: dict[CounterKey, list[int]] = {}
        self._undo: list[tuple[dict[Any, Any], Any, Any]] = []  # (mapping, key, previous value or _MISSING)

    # chain head, for jobs that read it
    @property
    def next_index(self) -> int:
        return self.state.next_index

    @property
    def frontier(self) -> Frontier:
        return self.state.frontier

    # -- per-job undo -------------------------------------------------------------------------------------------
    def mark(self) -> tuple[Any, ...]:
        s = self.state
        return (s.next_index, s.prev_hash, Frontier(s.frontier.size, list(s.frontier.nodes)), self.appended,
                len(self._log), len(self._checkpoints), len(self._new_reservations),
                len(self._reservation_updates), len(self._runs), len(self._undo))

    def undo(self, mark: tuple[Any, ...]) -> None:
        s = self.state
        (s.next_index, s.prev_hash, s.frontier, self.appended, n_log, n_cp, n_new, n_upd, n_runs, n_undo) = mark
        del self._log[n_log:], self._checkpoints[n_cp:], self._new_reservations[n_new:]
        del self._reservation_updates[n_upd:], self._runs[n_runs:]
        while len(self._undo) > n_undo:
            mapping, key, old = self._undo.pop()
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old

    def _remember(self, mapping: dict[Any, Any], key: Any) -> None:
        old = mapping.get(key, _MISSING)
        self._undo.append((mapping, key, list(old) if isinstance(old, list) else old))

    # -- the log ------------------------------------------------------------------------------------------------
    def append(self, kind: str, fields: Mapping[str, Any]) -> LogEntry:
        s = self.state
        body = {
            **fields,
            "schema_version": SCHEMA_VERSION,
            "index": s.next_index,
            "ts": iso(utc_now()),
            "kind": kind,
            "prev_hash": s.prev_hash,
        }
        if s.next_index == 0:  # the log's first entry names the key that signs it (see Store._load_signer)
            signer = self.store.signer
            body["log_key"] = {"key_id": signer.key_id, "public_key_pem": signer.public_key_pem()}
        data = canonical_json(body)
        entry_hash = sha256_hex(data)
        self._log.append((s.next_index, entry_hash, data, *columns(body)))
        s.frontier.append(entry_hash)
        entry = LogEntry(s.next_index, entry_hash, body)
        s.next_index += 1
        s.prev_hash = entry_hash
        self.appended += 1
        every = self.store.checkpoint_every
        if every and s.frontier.size % every == 0:
            self.add_checkpoint(self.store._signed_checkpoint(s.frontier))
        return entry

    def add_checkpoint(self, cp: Checkpoint) -> None:
        self._checkpoints.append((cp.tree_size, cp.root_hash, cp.ts, cp.key_id, cp.signature))

    # -- run ownership ------------------------------------------------------------------------------------------
    def run_owner(self, run: str) -> str | None:
        cache = self.state.runs
        if run not in cache:  # a read fills the cache with the committed value: no undo needed
            row = self.conn.execute("SELECT project FROM runs WHERE run=?", (run,)).fetchone()
            cache[run] = None if row is None else str(row[0])
        return cache[run]

    def claim_run(self, run: str, project: str, decision_index: int) -> None:
        self._remember(self.state.runs, run)
        self.state.runs[run] = project
        self._runs.append((run, project, decision_index))

    # -- quota counters -----------------------------------------------------------------------------------------
    def counters(self, keys: list[CounterKey]) -> list[list[int]]:
        cache = self.state.counters
        missing = [k for k in keys if k not in cache]
        if missing:  # a read fills the cache with committed values: no undo needed
            cache.update(_read_counters(self.conn, missing))
        return [cache[k] for k in keys]

    def usage(self, project: str | None, user: str | None, run: str | None, day: str) -> Usage:
        return _usage(self.counters(_usage_keys(project, user, run, day)))

    def apply(self, project: str | None, user: str | None, run: str | None, day: str, tokens: int,
              records: int) -> None:
        changes: list[tuple[CounterKey, int, int]] = []
        if project is not None:
            changes.append((("project", project, day), tokens, 0))
            if run is not None:
                changes.append((_run_key(project, run), tokens, records))
        if user is not None:
            changes.append((("user", user, day), tokens, 0))
        if not changes:
            return
        values = self.counters([k for k, _, _ in changes])
        for (key, t, r), value in zip(changes, values, strict=True):
            self._remember(self.state.counters, key)
            self._remember(self._deltas, key)
            value[0] += t
            value[1] += r
            d = self._deltas.setdefault(key, [0, 0])
            d[0] += t
            d[1] += r

    # -- reservations -------------------------------------------------------------------------------------------
    def reservation(self, reservation_id: str) -> tuple[Any, ...] | None:
        cache = self.state.reservations
        row = cache.get(reservation_id)
        if row is None:
            row = self.conn.execute(
                "SELECT project, user, run, day, tokens_reserved, records_reserved, state, decision_index "
                "FROM reservations WHERE id=?", (reservation_id,)).fetchone()
            if row is not None:
                cache[reservation_id] = row = tuple(row)
        return row

    def add_reservation(self, reservation_id: str, decision_index: int, project: str | None, user: str | None,
                        run: str | None, day: str, tokens: int, records: int) -> None:
        created = time.time()
        self._new_reservations.append((reservation_id, decision_index, project, user, run, day, tokens, records,
                                       created, created + self.store.reservation_ttl_s))
        self._remember(self.state.reservations, reservation_id)
        self.state.reservations[reservation_id] = (project, user, run, day, tokens, records, "held", decision_index)

    def close_reservation(self, reservation_id: str, state: str, tokens_charged: int, records_charged: int) -> None:
        row = self.reservation(reservation_id)
        assert row is not None
        self._reservation_updates.append((state, tokens_charged, records_charged, reservation_id))
        self._remember(self.state.reservations, reservation_id)
        self.state.reservations[reservation_id] = (*row[:6], state, row[7])

    # -- commit -------------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Write the buffered rows (inside the open transaction); the caller commits."""
        conn = self.conn
        if self._log:
            conn.executemany(
                "INSERT INTO log (idx, entry_hash, body, kind, ts, run, project, user) VALUES (?,?,?,?,?,?,?,?)",
                self._log)
        if self._runs:
            conn.executemany("INSERT INTO runs (run, project, decision_index) VALUES (?,?,?)", self._runs)
        if self._new_reservations:
            conn.executemany(
                "INSERT INTO reservations (id, decision_index, project, user, run, day, tokens_reserved, "
                "records_reserved, state, created, expires) VALUES (?,?,?,?,?,?,?,?,'held',?,?)",
                self._new_reservations)
        if self._reservation_updates:
            conn.executemany("UPDATE reservations SET state=?, tokens_charged=?, records_charged=? WHERE id=?",
                             self._reservation_updates)
        deltas = [(sc, k, d, t, r) for (sc, k, d), (t, r) in self._deltas.items() if t or r]
        if deltas:
            conn.executemany(
                "INSERT INTO counters (scope, key, day, tokens, records) VALUES (?,?,?,?,?) ON CONFLICT(scope, key, "
                "day) DO UPDATE SET tokens = tokens + excluded.tokens, records = records + excluded.records", deltas)
        if self._checkpoints:
            conn.executemany(
                "INSERT OR REPLACE INTO checkpoints (tree_size, root_hash, ts, key_id, signature) VALUES (?,?,?,?,?)",
                self._checkpoints)
        if not self.appended:
            return
        frontier = self.state.frontier
        head = self.head = self.store._signed_checkpoint(frontier)
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         [("frontier", orjson.dumps(frontier.to_json())), ("head", orjson.dumps(head.as_dict()))])
        # closed reservations are settled for good: keep the cache small
        for _, _, _, rid in self._reservation_updates:
            self.state.reservations.pop(rid, None)


def _backfill_runs(conn: sqlite3.Connection) -> None:
    """A log written before runs had owners: each run belongs to the project of its first allowed decision."""
    rows = conn.execute("SELECT idx, body FROM log WHERE kind='decision' ORDER BY idx")
    for idx, body in rows.fetchall():
        entry = orjson.loads(body)
        if entry.get("decision") == "allow" and entry.get("request_kind") == "inference" and entry.get("run") \
                and entry.get("project"):
            conn.execute("INSERT OR IGNORE INTO runs (run, project, decision_index) VALUES (?,?,?)",
                         (entry["run"], entry["project"], idx))


@dataclass(slots=True)
class _Job:
    fn: Callable[[_Txn], Any]
    #: resolved after COMMIT: a concurrent Future for threads, an asyncio Future (with ``loop``) for coroutines
    done: Any
    #: resolved as soon as the job ran, before COMMIT (optional)
    early: Any = None
    loop: asyncio.AbstractEventLoop | None = None
    #: nobody waits for this job's commit: it may wait for the next job to share one (``Store.lazy_commit_s``)
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


def _deliver(jobs: list[_Job], outcomes: list[tuple[bool, Any]], early: bool) -> None:
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


class Store:
    """Quota ledger + decision log. Open with ``Store.open(path)``; close with ``close()`` (or a with-block)."""

    def __init__(
        self,
        path: str | Path,
        *,
        signer: Signer | None = None,
        checkpoint_every: int = 1000,
        reservation_ttl_s: float = 600.0,
        batch_max: int = 512,
        lazy_commit_s: float = 0.002,
        witness: str | Path | None = None,
    ) -> None:
        """``witness``: the file every signed head is appended to (default ``$DISTILLGATE_WITNESS`` or
        ``<db>.witness.jsonl``; none for ``:memory:``)."""
        self.path = Path(path)
        memory = str(path) == ":memory:"
        if not memory and not self.path.parent.exists():
            raise NotFoundError(f"directory of --db {self.path} does not exist", hint="create it or choose another path")
        conn = self._connect()
        self._init_schema(conn)
        self.signer = self._load_signer(conn, signer)
        self.witness = None if memory else WitnessFile(witness or default_witness_path(self.path))
        self.checkpoint_every = checkpoint_every
        self.reservation_ttl_s = reservation_ttl_s
        self.batch_max = batch_max
        self.lazy_commit_s = lazy_commit_s
        self._local = threading.local()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer_conn = conn
        self._lock_fd: int | None = None
        if str(path) != ":memory:":  # see _run_batch: several processes' writers take turns on this lock
            self._lock_fd = os.open(str(self.path) + ".write-lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._state: _State | None = None  # the writer's cache; see _State
        self._closed = False
        self._thread = threading.Thread(target=self._writer_loop, name="distillgate-ledger-writer", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: str | Path, **kwargs: Any) -> Store:
        return cls(path, **kwargs)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections ----------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=60.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=60000")
        except sqlite3.DatabaseError as exc:
            raise UserError(f"cannot open store {self.path}: {exc}", hint="is --db a distillgate SQLite file?") from exc
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            had_runs = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone()
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if not had_runs:
                _backfill_runs(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _load_signer(self, conn: sqlite3.Connection, signer: Signer | None) -> Signer:
        """The key that signs this log. A log with entries is signed by the key named in its first entry (or, for
        a log written before entries named it, the key recorded in ``meta``); a missing or different key file is
        refused, never replaced, since every later checkpoint would then fail verification for ever."""
        key_path = default_key_path(self.path)
        first = conn.execute("SELECT body FROM log ORDER BY idx LIMIT 1").fetchone()
        recorded = conn.execute("SELECT value FROM meta WHERE key='public_key'").fetchone()
        recorded_pem = None if recorded is None else (
            recorded[0].decode() if isinstance(recorded[0], bytes) else str(recorded[0]))
        if first is not None:
            log_key = orjson.loads(first[0]).get("log_key") or {}
            recorded_pem = log_key.get("public_key_pem") or recorded_pem
        if signer is None:
            if first is not None and not key_path.exists():
                raise IntegrityError(
                    f"the decision log {self.path} has entries, but its signing key {key_path} is missing",
                    hint=f"restore {key_path} from the backup of this store (or point $DISTILLGATE_SIGNING_KEY at "
                         "it); distillgate never creates a new key for a log that has entries")
            signer = Signer.load_or_create(key_path)
        if first is not None and recorded_pem is not None and recorded_pem.strip() != signer.public_key_pem().strip():
            raise IntegrityError(
                f"the signing key {key_path} (key {signer.key_id}) is not the key the decision log {self.path} was "
                "started with (recorded in its first entry)",
                hint=f"restore the original {key_path} (or point $DISTILLGATE_SIGNING_KEY at it); `distillgate audit "
                     "verify` shows the recorded key")
        if first is None and recorded_pem != signer.public_key_pem():  # nothing signed yet: this key starts the log
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('public_key', ?)",
                         (signer.public_key_pem(),))
        return signer

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    # -- the writer -----------------------------------------------------------------------------------------------
    def _writer_loop(self) -> None:
        conn = self._writer_conn
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch: list[_Job] = [first]
            stop = self._drain(batch)
            if self._run_batch(conn, batch) or stop:
                break
        conn.close()

    def _drain(self, batch: list[_Job]) -> bool:
        """Add the jobs already queued (up to ``batch_max``); True when the store is closing."""
        while len(batch) < self.batch_max:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return False
            if nxt is None:
                return True
            batch.append(nxt)
        return False

    def _begin(self, conn: sqlite3.Connection) -> _State:
        """BEGIN IMMEDIATE (the write lock), then the cached state, reloaded if anyone else committed since."""
        conn.execute("BEGIN IMMEDIATE")
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        state = self._state
        if state is None or state.data_version != version:
            state = self._state = _State(conn, version)
        elif len(state.counters) > COUNTER_CACHE_MAX:  # a long-lived gateway sees many runs and days: start afresh
            state.counters.clear()
        return state

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> bool:
        """Run ``batch`` in one transaction and commit it. A batch of lazy jobs only (settlements nobody waits for)
        keeps its transaction open for up to ``lazy_commit_s`` to share its commit with the next job that arrives.
        Returns True when the store began closing meanwhile."""
        if self._lock_fd is None:
            return self._run_batch_locked(conn, batch)
        # Writers of several processes queue on a file lock, which the kernel hands over at once; SQLite's own
        # busy handler would sleep 1, 2, 5, 10 ... ms between tries.
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            return self._run_batch_locked(conn, batch)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _run_batch_locked(self, conn: sqlite3.Connection, batch: list[_Job]) -> bool:
        outcomes: list[tuple[bool, Any]] = []
        delivered = 0  # jobs whose early answer went out
        stop = False
        try:
            try:
                txn = _Txn(conn, self, self._begin(conn))
                self._run_jobs(txn, batch, outcomes)
                deadline = time.monotonic() + self.lazy_commit_s
                while all(job.lazy for job in batch) and len(batch) < self.batch_max:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=wait)
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
                _deliver(batch, outcomes, early=True)
                delivered = len(batch)
                conn.execute("COMMIT")
                self._witness_commit(txn)
            except BaseException:
                self._state = None  # the cache ran ahead of what is committed
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:  # the transaction failed: nobody's work is durable
            failed = [(False, exc)] * len(batch)
            _deliver(batch[delivered:], failed[delivered:], early=True)
            _deliver(batch, failed, early=False)
            return stop
        _deliver(batch, outcomes, early=False)
        return stop

    def _witness_commit(self, txn: _Txn) -> None:
        """Append the heads this commit signed to the witness file (see ledger/witness.py)."""
        if self.witness is None:
            return
        heads = [dict(zip(("tree_size", "root_hash", "ts", "key_id", "signature"), row, strict=True))
                 for row in txn._checkpoints]
        if txn.head is not None:
            heads.append(txn.head.as_dict())
        self.witness.append(heads, sync=bool(txn._checkpoints))

    @staticmethod
    def _run_jobs(txn: _Txn, jobs: list[_Job], outcomes: list[tuple[bool, Any]]) -> None:
        for job in jobs:
            mark = txn.mark()
            try:
                outcomes.append((True, job.fn(txn)))
            except Exception as exc:
                txn.undo(mark)
                outcomes.append((False, exc))

    def _submit(self, job: _Job) -> None:
        if self._closed:
            raise InternalError("the store is closed")
        self._queue.put(job)

    def _call(self, fn: Callable[[_Txn], T]) -> T:
        fut: Future[T] = Future()
        self._submit(_Job(fn, fut))
        return fut.result()

    async def _acall(self, fn: Callable[[_Txn], T], *, lazy: bool = False) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._submit(_Job(fn, fut, loop=loop, lazy=lazy))
        return await fut

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        if self.witness is not None:
            self.witness.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _signed_checkpoint(self, frontier: Frontier) -> Checkpoint:
        payload = {"tree_size": frontier.size, "root_hash": frontier.root(), "ts": iso(utc_now()),
                   "key_id": self.signer.key_id}
        return Checkpoint(signature=self.signer.sign_json(payload), **payload)  # type: ignore[arg-type]

    def checkpoint(self) -> Checkpoint:
        """Write a signed checkpoint of the current tree now (on demand)."""

        def job(txn: _Txn) -> Checkpoint:
            cp = self._signed_checkpoint(txn.frontier)
            txn.add_checkpoint(cp)
            return cp

        return self._call(job)

    # -- decisions and quotas -------------------------------------------------------------------------------------
    def _admit_job(self, policies: Policy | PolicySet, request: Request, request_hash: str | None,
                   key_id: str | None, content: Any, extra: Mapping[str, Any] | None) -> Callable[[_Txn], Admission]:
        def job(txn: _Txn) -> Admission:
            policy = policies.select(request.project) if isinstance(policies, PolicySet) else policies
            day = utc_day(txn.now)
            usage = txn.usage(request.project, request.user, request.run, day)
            if request.run:  # a run belongs to one project: decided in this transaction, so two cannot both claim it
                usage = replace(usage, run_project=txn.run_owner(request.run))
            decision = decide(policy, request, usage)
            reservation_id = None
            tokens = records = 0
            if decision.allowed and request.kind == "inference":
                reservation_id = uuid.uuid4().hex
                tokens, records = request.tokens_requested, request.records_requested
                txn.apply(request.project, request.user, request.run, day, tokens, records)
            fields: dict[str, Any] = {
                "policy_id": decision.policy_id,
                "policy_hash": decision.policy_hash,
                "user": request.user,
                "project": request.project,
                "run": request.run,
                "model": request.model,
                "output_type": request.output_type,
                "request_kind": request.kind,
                "decision": "allow" if decision.allowed else "deny",
                "reasons": list(decision.reasons),
                "message": decision.message,
                "tokens_requested": request.tokens_requested,
                "records_requested": request.records_requested,
                "tokens_reserved": tokens,
                "reservation_id": reservation_id,
                "request_hash": request_hash,
                "key_id": key_id,
                "usage_before": {"tokens_today_project": usage.tokens_today_project,
                                 "tokens_today_user": usage.tokens_today_user, "records_run": usage.records_run},
            }
            if request.destination is not None:
                fields["destination"] = request.destination
            if extra:
                fields["extra"] = dict(extra)
            if content is not None and policy.audit.log_content:
                fields["content"] = content
            if not decision.allowed:  # anyone can be denied: what they sent is stored bounded (ledger/entries.py)
                fields = bound_denial(fields, authenticated=request.auth == "ok")
            entry = txn.append("decision", fields)
            if decision.allowed and request.kind == "inference" and request.run and request.project \
                    and usage.run_project is None:
                txn.claim_run(request.run, request.project, entry.index)
            if reservation_id is not None:
                txn.add_reservation(reservation_id, entry.index, request.project, request.user, request.run, day,
                                    tokens, records)
            return Admission(decision, entry, reservation_id, tokens, records)

        return job

    def admit(self, policies: Policy | PolicySet, request: Request, *, request_hash: str | None = None,
              key_id: str | None = None, content: Any = None, extra: Mapping[str, Any] | None = None) -> Admission:
        """Decide, reserve and log in one durable transaction."""
        return self._call(self._admit_job(policies, request, request_hash, key_id, content, extra))

    async def aadmit(self, policies: Policy | PolicySet, request: Request, *, request_hash: str | None = None,
                     key_id: str | None = None, content: Any = None,
                     extra: Mapping[str, Any] | None = None) -> Admission:
        return await self._acall(self._admit_job(policies, request, request_hash, key_id, content, extra))

    async def aadmit_early(self, policies: Policy | PolicySet, request: Request, *, request_hash: str | None = None,
                           key_id: str | None = None, content: Any = None,
                           extra: Mapping[str, Any] | None = None) -> tuple[Admission, asyncio.Future[Admission]]:
        """Like ``aadmit``, but return the admission as soon as it is decided and reserved, *before* its commit.

        The second value resolves once the decision is durable (or raises if the commit failed). A caller may start
        forwarding an allowed request while the fsync runs, but must await the second value before it tells the
        client anything: a client never learns of a decision that is not in the log.
        """
        loop = asyncio.get_running_loop()
        early: asyncio.Future[Admission] = loop.create_future()
        durable: asyncio.Future[Admission] = loop.create_future()
        self._submit(_Job(self._admit_job(policies, request, request_hash, key_id, content, extra), durable, early,
                          loop))
        try:
            return await early, durable
        except BaseException:
            durable.cancel()
            raise

    def _settle_job(self, reservation_id: str, prompt_tokens: int | None, completion_tokens: int | None,
                    records: int | None, response_hash: str | None, upstream_id: str | None, outcome: str,
                    reasons: tuple[str, ...], extra: Mapping[str, Any] | None) -> Callable[[_Txn], LogEntry]:
        def job(txn: _Txn) -> LogEntry:
            row = txn.reservation(reservation_id)
            if row is None:
                raise NotFoundError(f"no reservation {reservation_id!r}")
            project, user, run, day, t_res, r_res, state, decision_index = row
            # A reservation reclaimed while its request still ran (its lease lapsed) is refunded already: the late
            # settlement still charges what was used, against nothing held.
            late = state == "expired"
            if state != "held" and not late:
                raise UserError(f"reservation {reservation_id} is already {state}")
            used = None if prompt_tokens is None and completion_tokens is None else \
                int(prompt_tokens or 0) + int(completion_tokens or 0)
            if outcome == "ok":
                tokens_charged = used if used is not None else t_res
                records_charged = r_res if records is None else int(records)
                new_state = "settled"
            else:  # failure: charge only what is known to have been used, refund the rest
                tokens_charged = used or 0
                records_charged = int(records or 0)
                new_state = "refunded" if tokens_charged == 0 and records_charged == 0 else "settled"
            # The reservation is the upper bound granted against the quota: usage reported above it is an
            # overrun, recorded (never absorbed into the counters, so granted never exceeds the quota).
            overrun = max(0, tokens_charged - t_res)
            tokens_charged -= overrun
            records_charged = min(records_charged, r_res)
            held_t, held_r = (0, 0) if late else (t_res, r_res)
            txn.apply(project, user, run, day, tokens_charged - held_t, records_charged - held_r)
            txn.close_reservation(reservation_id, new_state, tokens_charged, records_charged)
            codes = list(reasons)
            if outcome == "upstream_error" or outcome == "timeout":
                codes.append("UPSTREAM_ERROR")
            elif outcome == "client_disconnected":
                codes.append("CLIENT_DISCONNECTED")
            elif outcome == "gateway_error":
                codes.append("GATEWAY_ERROR")
            if overrun:
                codes.append("USAGE_OVERRUN")
            fields: dict[str, Any] = {
                "reservation_id": reservation_id, "decision_index": decision_index, "project": project,
                "user": user, "run": run, "outcome": outcome, "reasons": list(dict.fromkeys(codes)),
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "tokens_reserved": t_res, "tokens_charged": tokens_charged, "tokens_refunded": t_res - tokens_charged,
                "records_charged": records_charged, "response_hash": response_hash, "upstream_id": upstream_id,
            }
            if overrun:
                fields["tokens_overrun"] = overrun
            if late:
                fields["settled_after_expiry"] = True
            if extra:
                fields["extra"] = dict(extra)
            return txn.append("settlement", fields)

        return job

    def settle(self, reservation_id: str, *, prompt_tokens: int | None = None, completion_tokens: int | None = None,
               records: int | None = None, response_hash: str | None = None, upstream_id: str | None = None,
               outcome: str = "ok", reasons: tuple[str, ...] = (), extra: Mapping[str, Any] | None = None) -> LogEntry:
        """Replace a reservation by real usage (``outcome="ok"``) or refund it (any other outcome)."""
        return self._call(self._settle_job(reservation_id, prompt_tokens, completion_tokens, records, response_hash,
                                           upstream_id, outcome, reasons, extra))

    async def asettle(self, reservation_id: str, *, prompt_tokens: int | None = None,
                      completion_tokens: int | None = None, records: int | None = None,
                      response_hash: str | None = None, upstream_id: str | None = None, outcome: str = "ok",
                      reasons: tuple[str, ...] = (), extra: Mapping[str, Any] | None = None,
                      lazy: bool = False) -> LogEntry:
        """``settle`` for coroutines. ``lazy=True`` (a settlement committed after the answer went out): its commit
        may wait up to ``lazy_commit_s`` for the next decision, so both share one fsync."""
        return await self._acall(self._settle_job(reservation_id, prompt_tokens, completion_tokens, records,
                                                  response_hash, upstream_id, outcome, reasons, extra), lazy=lazy)

    def _reclaim_job(self, now: float | None) -> Callable[[_Txn], int]:
        def job(txn: _Txn) -> int:
            cutoff = time.time() if now is None else now
            rows = txn.conn.execute(
                "SELECT id, project, user, run, day, tokens_reserved, records_reserved, decision_index "
                "FROM reservations WHERE state='held' AND expires < ?", (cutoff,),
            ).fetchall()
            # the table is as last committed; this transaction may have settled some of them already
            rows = [r for r in rows if (cached := txn.reservation(r[0])) is None or cached[6] == "held"]
            for rid, project, user, run, day, t_res, r_res, decision_index in rows:
                txn.apply(project, user, run, day, -t_res, -r_res)
                txn.close_reservation(rid, "expired", 0, 0)
                txn.append("reclaim", {
                    "reservation_id": rid, "decision_index": decision_index, "project": project, "user": user,
                    "run": run, "reasons": ["RESERVATION_EXPIRED"], "tokens_refunded": t_res,
                    "records_refunded": r_res,
                })
            return len(rows)

        return job

    def _extend_job(self, reservation_ids: Sequence[str]) -> Callable[[_Txn], int]:
        def job(txn: _Txn) -> int:
            expires = time.time() + self.reservation_ttl_s
            cur = txn.conn.executemany("UPDATE reservations SET expires=? WHERE id=? AND state='held'",
                                       [(expires, rid) for rid in reservation_ids])
            return int(cur.rowcount)

        return job

    async def aextend(self, reservation_ids: Sequence[str]) -> int:
        """Renew the lease of reservations whose requests are still in flight (``reservation_ttl_s`` from now), so
        that reclaim never refunds a request that is still running. Returns how many were held."""
        return await self._acall(self._extend_job(list(reservation_ids)))

    def reclaim_expired(self, now: float | None = None) -> int:
        """Refund reservations whose request never settled (killed process, lost connection)."""
        return self._call(self._reclaim_job(now))

    async def areclaim_expired(self, now: float | None = None) -> int:
        return await self._acall(self._reclaim_job(now))

    def append_event(self, kind: str, fields: Mapping[str, Any]) -> LogEntry:
        """Append any other governance event (review, export, flag, ...)."""
        if kind in ("decision", "settlement", "reclaim"):
            raise UserError(f"event kind {kind!r} is reserved")
        return self._call(lambda txn: txn.append(kind, fields))

    async def aappend_event(self, kind: str, fields: Mapping[str, Any]) -> LogEntry:
        if kind in ("decision", "settlement", "reclaim"):
            raise UserError(f"event kind {kind!r} is reserved")
        return await self._acall(lambda txn: txn.append(kind, fields))

    # -- reads ----------------------------------------------------------------------------------------------------
    def usage(self, project: str | None, user: str | None, run: str | None, day: str | None = None) -> Usage:
        keys = _usage_keys(project, user, run, day or utc_day())
        found = _read_counters(self._reader(), keys)
        return _usage([found[k] for k in keys])

    def run_tokens(self, project: str, run: str) -> int:
        key = _run_key(project, run)
        return _read_counters(self._reader(), [key])[key][0]

    def size(self) -> int:
        row = self._reader().execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM log").fetchone()
        return int(row[0])

    def entries(self, *, run: str | None = None, start: int = 0, kind: str | None = None,
                project: str | None = None) -> Iterator[LogEntry]:
        """Entries from ``start``, optionally of one run (of one project) and one kind. The run is selected on the
        hashed body itself (an index over its ``run`` field) and the rest of a run's slice from the body, so no edited
        column can move a row in or out of a run's slice (or export). Without a run, the ``kind`` and ``project``
        columns narrow the scan and every selected row is re-checked against its body (see ledger/entries.py)."""
        sql = "SELECT idx, entry_hash, body FROM log WHERE idx >= ?"
        args: list[Any] = [start]
        wanted = {"run": run, "kind": kind, "project": project}
        if run is not None:
            sql += " AND json_extract(CAST(body AS TEXT), '$.run') = ?"
            args.append(run)
        for name in ("kind", "project"):
            if wanted[name] is not None and run is None:
                sql += f" AND {name} = ?"
                args.append(wanted[name])
        for idx, entry_hash, body in self._reader().execute(sql + " ORDER BY idx", args):
            parsed = orjson.loads(body)
            if all(value is None or parsed.get(name) == value for name, value in wanted.items()):
                yield LogEntry(int(idx), str(entry_hash), parsed)

    def run_owner(self, run: str) -> str | None:
        """The project that owns ``run`` (its first allowed inference decision), or None."""
        row = self._reader().execute("SELECT project FROM runs WHERE run=?", (run,)).fetchone()
        return None if row is None else str(row[0])

    def entry(self, index: int) -> LogEntry:
        row = self._reader().execute("SELECT idx, entry_hash, body FROM log WHERE idx=?", (index,)).fetchone()
        if row is None:
            raise NotFoundError(f"no log entry {index}")
        return LogEntry(int(row[0]), str(row[1]), orjson.loads(row[2]))

    def entry_hashes(self, size: int | None = None) -> list[str]:
        sql = "SELECT entry_hash FROM log ORDER BY idx"
        rows = self._reader().execute(sql if size is None else sql + " LIMIT ?", () if size is None else (size,))
        return [str(r[0]) for r in rows]

    def head(self) -> Checkpoint | None:
        row = self._reader().execute("SELECT value FROM meta WHERE key='head'").fetchone()
        return None if row is None else Checkpoint(**orjson.loads(row[0]))

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._reader().execute(
            "SELECT tree_size, root_hash, ts, key_id, signature FROM checkpoints ORDER BY tree_size"
        ).fetchall()
        return [Checkpoint(int(a), str(b), str(c), str(d), str(e)) for a, b, c, d, e in rows]

    def reservation(self, reservation_id: str) -> dict[str, Any]:
        conn = self._reader()
        cur = conn.execute("SELECT * FROM reservations WHERE id=?", (reservation_id,))
        row = cur.fetchone()
        if row is None:
            raise NotFoundError(f"no reservation {reservation_id!r}")
        return dict(zip([d[0] for d in cur.description], row, strict=True))
