"""The ``Store``: quota ledger and decision log in one SQLite database (WAL, fsync on every commit).

Why one database: a decision, the quota reservation it makes and its log entry commit in *one* transaction, so a
crash can never leave a reservation without its decision or a logged grant without its reservation.

Concurrency model
-----------------
* Every write runs on one writer thread per ``Store``; callers hand it a job and wait for its future. The writer
  drains whatever jobs are queued and runs them in one ``BEGIN IMMEDIATE`` transaction, so concurrent callers share
  one commit (one fsync: group commit). Each job runs in its own SAVEPOINT: one failing job does not fail others.
* Several processes may open the same file. ``BEGIN IMMEDIATE`` takes SQLite's write lock, and the writer reads
  the chain head, the Merkle frontier and quota counters *inside* the transaction, so quotas stay exact and the
  hash chain stays linear across processes.
* A caller is told the outcome only after COMMIT returned (``synchronous=FULL``): an acknowledged decision is
  durable.

Quotas are reservation-based: ``admit`` reserves ``prompt_tokens + max_tokens * n`` tokens and ``n`` records,
``settle`` replaces the reservation by what was used (or refunds it), and ``reclaim_expired`` refunds reservations
whose request died without settling. Days are UTC calendar days.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from distillgate.errors import InternalError, NotFoundError, UserError
from distillgate.ledger.canonical import canonical_json, sha256_hex
from distillgate.ledger.merkle import Frontier
from distillgate.ledger.signing import Signer, default_key_path
from distillgate.policy.decision import Decision, Request, Usage, decide
from distillgate.policy.model import Policy, PolicySet

SCHEMA_VERSION = 1
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


class _Txn:
    """State of one write transaction: chain head and Merkle frontier, read inside the lock."""

    def __init__(self, conn: sqlite3.Connection, store: Store) -> None:
        self.conn = conn
        self.store = store
        row = conn.execute("SELECT idx, entry_hash FROM log ORDER BY idx DESC LIMIT 1").fetchone()
        self.next_index = 0 if row is None else row[0] + 1
        self.prev_hash = GENESIS_HASH if row is None else row[1]
        fr = conn.execute("SELECT value FROM meta WHERE key='frontier'").fetchone()
        self.frontier = Frontier.from_json(orjson.loads(fr[0])) if fr else Frontier()
        if self.frontier.size != self.next_index:
            raise InternalError(
                f"Merkle frontier size {self.frontier.size} != log size {self.next_index}",
                hint="the database was modified outside distillgate; run `distillgate audit verify`",
            )
        self.appended = 0
        self.now = utc_now()

    def append(self, kind: str, fields: Mapping[str, Any]) -> LogEntry:
        body = {
            **fields,
            "schema_version": SCHEMA_VERSION,
            "index": self.next_index,
            "ts": iso(utc_now()),
            "kind": kind,
            "prev_hash": self.prev_hash,
        }
        data = canonical_json(body)
        entry_hash = sha256_hex(data)
        self.conn.execute(
            "INSERT INTO log (idx, entry_hash, body, kind, ts, run, project, user) VALUES (?,?,?,?,?,?,?,?)",
            (self.next_index, entry_hash, data, kind, body["ts"], body.get("run"), body.get("project"),
             body.get("user")),
        )
        self.frontier.append(entry_hash)
        entry = LogEntry(self.next_index, entry_hash, body)
        self.next_index += 1
        self.prev_hash = entry_hash
        self.appended += 1
        every = self.store.checkpoint_every
        if every and self.frontier.size % every == 0:
            self.store._write_checkpoint(self.conn, self.frontier)
        return entry

    def finish(self) -> None:
        if not self.appended:
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('frontier', ?)", (orjson.dumps(self.frontier.to_json()),)
        )
        head = self.store._signed_checkpoint(self.frontier)
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('head', ?)", (orjson.dumps(head.as_dict()),))


# (work, future resolved after COMMIT, optional future resolved as soon as the work ran, before COMMIT)
_Job = tuple[Callable[[_Txn], Any], "Future[Any]", "Future[Any] | None"]


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
    ) -> None:
        self.path = Path(path)
        if str(path) != ":memory:" and not self.path.parent.exists():
            raise NotFoundError(f"directory of --db {self.path} does not exist", hint="create it or choose another path")
        self.signer = signer or Signer.load_or_create(default_key_path(self.path))
        self.checkpoint_every = checkpoint_every
        self.reservation_ttl_s = reservation_ttl_s
        self.batch_max = batch_max
        self._local = threading.local()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        conn = self._connect()
        self._init_schema(conn)
        self._writer_conn = conn
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
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key='public_key'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('public_key', ?)", (self.signer.public_key_pem(),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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
            stop = False
            while len(batch) < self.batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)
            if stop:
                break
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                txn = _Txn(conn, self)
                for fn, _, early in batch:
                    conn.execute("SAVEPOINT job")
                    saved = (txn.next_index, txn.prev_hash, Frontier(txn.frontier.size, list(txn.frontier.nodes)),
                             txn.appended)
                    try:
                        value = fn(txn)
                        conn.execute("RELEASE job")
                        results.append((True, value))
                        if early is not None:
                            early.set_result(value)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                        txn.next_index, txn.prev_hash, txn.frontier, txn.appended = saved
                        results.append((False, exc))
                        if early is not None:
                            early.set_exception(exc)
                txn.finish()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:  # the commit itself failed: nobody's work is durable
            for _, fut, early in batch:
                fut.set_exception(exc)
                if early is not None and not early.done():
                    early.set_exception(exc)
            return
        for (ok, value), (_, fut, _early) in zip(results, batch, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def _submit(self, fn: Callable[[_Txn], T], early: Future[T] | None = None) -> Future[T]:
        if self._closed:
            raise InternalError("the store is closed")
        fut: Future[T] = Future()
        self._queue.put((fn, fut, early))
        return fut

    def _call(self, fn: Callable[[_Txn], T]) -> T:
        return self._submit(fn).result()

    async def _acall(self, fn: Callable[[_Txn], T]) -> T:
        return await asyncio.wrap_future(self._submit(fn))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _signed_checkpoint(self, frontier: Frontier) -> Checkpoint:
        payload = {"tree_size": frontier.size, "root_hash": frontier.root(), "ts": iso(utc_now()),
                   "key_id": self.signer.key_id}
        return Checkpoint(signature=self.signer.sign_json(payload), **payload)  # type: ignore[arg-type]

    def _write_checkpoint(self, conn: sqlite3.Connection, frontier: Frontier) -> Checkpoint:
        cp = self._signed_checkpoint(frontier)
        conn.execute(
            "INSERT OR REPLACE INTO checkpoints (tree_size, root_hash, ts, key_id, signature) VALUES (?,?,?,?,?)",
            (cp.tree_size, cp.root_hash, cp.ts, cp.key_id, cp.signature),
        )
        return cp

    def checkpoint(self) -> Checkpoint:
        """Write a signed checkpoint of the current tree now (on demand)."""

        def job(txn: _Txn) -> Checkpoint:
            return self._write_checkpoint(txn.conn, txn.frontier)

        return self._call(job)

    # -- decisions and quotas -------------------------------------------------------------------------------------
    @staticmethod
    def _counter(conn: sqlite3.Connection, scope: str, key: str, day: str) -> tuple[int, int]:
        row = conn.execute(
            "SELECT tokens, records FROM counters WHERE scope=? AND key=? AND day=?", (scope, key, day)
        ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def _apply(self, conn: sqlite3.Connection, project: str | None, user: str | None, run: str | None, day: str,
               tokens: int, records: int) -> None:
        rows: list[tuple[str, str, str, int, int]] = []
        if project is not None:
            rows.append(("project", project, day, tokens, 0))
            if run is not None:
                rows.append(("run", f"{project}\x1f{run}", "", tokens, records))
        if user is not None:
            rows.append(("user", user, day, tokens, 0))
        if not rows:
            return
        conn.execute(
            "INSERT INTO counters (scope, key, day, tokens, records) VALUES "
            + ",".join("(?,?,?,?,?)" for _ in rows)
            + " ON CONFLICT(scope, key, day) DO UPDATE SET tokens = tokens + excluded.tokens, "
            "records = records + excluded.records",
            [v for r in rows for v in r],
        )

    @staticmethod
    def _usage_in(conn: sqlite3.Connection, project: str | None, user: str | None, run: str | None,
                  day: str) -> Usage:
        keys = (("project", project or "", day), ("user", user or "", day), ("run", f"{project}\x1f{run}", ""))
        found = {(sc, k, d): (t, r) for sc, k, d, t, r in conn.execute(
            "SELECT scope, key, day, tokens, records FROM counters WHERE (scope, key, day) IN "
            "((?,?,?),(?,?,?),(?,?,?))", [v for key in keys for v in key])}
        return Usage(
            tokens_today_project=int(found.get(keys[0], (0, 0))[0]),
            tokens_today_user=int(found.get(keys[1], (0, 0))[0]),
            records_run=int(found.get(keys[2], (0, 0))[1]),
        )

    def _admit_job(self, policies: Policy | PolicySet, request: Request, request_hash: str | None,
                   key_id: str | None, content: Any, extra: Mapping[str, Any] | None) -> Callable[[_Txn], Admission]:
        def job(txn: _Txn) -> Admission:
            conn = txn.conn
            policy = policies.select(request.project) if isinstance(policies, PolicySet) else policies
            day = utc_day(txn.now)
            usage = self._usage_in(conn, request.project, request.user, request.run, day)
            decision = decide(policy, request, usage)
            reservation_id = None
            tokens = records = 0
            if decision.allowed and request.kind == "inference":
                reservation_id = uuid.uuid4().hex
                tokens, records = request.tokens_requested, request.records_requested
                self._apply(conn, request.project, request.user, request.run, day, tokens, records)
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
            entry = txn.append("decision", fields)
            if reservation_id is not None:
                conn.execute(
                    "INSERT INTO reservations (id, decision_index, project, user, run, day, tokens_reserved, "
                    "records_reserved, state, created, expires) VALUES (?,?,?,?,?,?,?,?,'held',?,?)",
                    (reservation_id, entry.index, request.project, request.user, request.run, day, tokens, records,
                     time.time(), time.time() + self.reservation_ttl_s),
                )
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
        early: Future[Admission] = Future()
        durable = asyncio.wrap_future(self._submit(
            self._admit_job(policies, request, request_hash, key_id, content, extra), early))
        try:
            return await asyncio.wrap_future(early), durable
        except BaseException:
            durable.cancel()
            raise

    def _settle_job(self, reservation_id: str, prompt_tokens: int | None, completion_tokens: int | None,
                    records: int | None, response_hash: str | None, upstream_id: str | None, outcome: str,
                    reasons: tuple[str, ...], extra: Mapping[str, Any] | None) -> Callable[[_Txn], LogEntry]:
        def job(txn: _Txn) -> LogEntry:
            conn = txn.conn
            row = conn.execute(
                "SELECT project, user, run, day, tokens_reserved, records_reserved, state, decision_index "
                "FROM reservations WHERE id=?", (reservation_id,),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no reservation {reservation_id!r}")
            project, user, run, day, t_res, r_res, state, decision_index = row
            if state != "held":
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
            self._apply(conn, project, user, run, day, tokens_charged - t_res, records_charged - r_res)
            conn.execute(
                "UPDATE reservations SET state=?, tokens_charged=?, records_charged=? WHERE id=?",
                (new_state, tokens_charged, records_charged, reservation_id),
            )
            codes = list(reasons)
            if outcome == "upstream_error" or outcome == "timeout":
                codes.append("UPSTREAM_ERROR")
            elif outcome == "client_disconnected":
                codes.append("CLIENT_DISCONNECTED")
            fields: dict[str, Any] = {
                "reservation_id": reservation_id, "decision_index": decision_index, "project": project,
                "user": user, "run": run, "outcome": outcome, "reasons": list(dict.fromkeys(codes)),
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "tokens_reserved": t_res, "tokens_charged": tokens_charged, "tokens_refunded": t_res - tokens_charged,
                "records_charged": records_charged, "response_hash": response_hash, "upstream_id": upstream_id,
            }
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
                      reasons: tuple[str, ...] = (), extra: Mapping[str, Any] | None = None) -> LogEntry:
        return await self._acall(self._settle_job(reservation_id, prompt_tokens, completion_tokens, records,
                                                  response_hash, upstream_id, outcome, reasons, extra))

    def _reclaim_job(self, now: float | None) -> Callable[[_Txn], int]:
        def job(txn: _Txn) -> int:
            conn = txn.conn
            cutoff = time.time() if now is None else now
            rows = conn.execute(
                "SELECT id, project, user, run, day, tokens_reserved, records_reserved, decision_index "
                "FROM reservations WHERE state='held' AND expires < ?", (cutoff,),
            ).fetchall()
            for rid, project, user, run, day, t_res, r_res, decision_index in rows:
                self._apply(conn, project, user, run, day, -t_res, -r_res)
                conn.execute("UPDATE reservations SET state='expired', tokens_charged=0, records_charged=0 "
                             "WHERE id=?", (rid,))
                txn.append("reclaim", {
                    "reservation_id": rid, "decision_index": decision_index, "project": project, "user": user,
                    "run": run, "reasons": ["RESERVATION_EXPIRED"], "tokens_refunded": t_res,
                    "records_refunded": r_res,
                })
            return len(rows)

        return job

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
        return self._usage_in(self._reader(), project, user, run, day or utc_day())

    def run_tokens(self, project: str, run: str) -> int:
        return self._counter(self._reader(), "run", f"{project}\x1f{run}", "")[0]

    def size(self) -> int:
        row = self._reader().execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM log").fetchone()
        return int(row[0])

    def entries(self, *, run: str | None = None, start: int = 0, kind: str | None = None) -> Iterator[LogEntry]:
        sql = "SELECT idx, entry_hash, body FROM log WHERE idx >= ?"
        args: list[Any] = [start]
        if run is not None:
            sql += " AND run = ?"
            args.append(run)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        for idx, entry_hash, body in self._reader().execute(sql + " ORDER BY idx", args):
            yield LogEntry(int(idx), str(entry_hash), orjson.loads(body))

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
