"""The ``Store``: quota ledger and decision log in one database (SQLite by default, PostgreSQL for replicas).

Why one database: a decision, the quota reservation it makes and its log entry commit in *one* transaction, so a
crash can never leave a reservation without its decision or a logged grant without its reservation.

This module is the façade: the rules of admitting, settling, reclaiming and reading, written once. Beneath it:

* ``ledger/writer.py`` — the writer thread: jobs batched into one transaction (group commit), answered after COMMIT;
* ``ledger/txn.py`` — one transaction over the writer's cached chain head, frontier and counters, per-job undo;
* ``ledger/charging.py`` — what a settlement charges (a pure function);
* ``ledger/schema.py`` — every table, as one ordered, recorded list of migrations;
* ``ledger/backend.py`` — the narrow seam to SQLite or PostgreSQL (write lock, cache validity).

Quotas are reservation-based: ``admit`` reserves ``prompt_tokens + max_tokens * n`` tokens and ``n`` records,
``settle`` replaces the reservation by what was used (or refunds it), and ``reclaim_expired`` refunds reservations
whose request died without settling. Days are UTC calendar days.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import orjson

from distillgate.db import Conn, is_postgres
from distillgate.errors import IntegrityError, NotFoundError, UserError
from distillgate.ledger.backend import open_backend
from distillgate.ledger.charging import charge
from distillgate.ledger.entries import bound_denial
from distillgate.ledger.merkle import Frontier
from distillgate.ledger.records import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    Admission,
    Checkpoint,
    LogEntry,
    Reservation,
    iso,
    iso_now,
    utc_day,
    utc_now,
)
from distillgate.ledger.schema import migrate
from distillgate.ledger.signing import Signer, default_key_path
from distillgate.ledger.txn import (
    META_UPSERT,
    State,
    Txn,
    as_usage,
    log_key_pem,
    read_counters,
    run_key,
    usage_keys,
)
from distillgate.ledger.witness import WitnessFile, default_witness_path
from distillgate.ledger.writer import COUNTER_CACHE_MAX, Durable, Job, Writer
from distillgate.policy.decision import Request, Usage, decide
from distillgate.policy.model import Policy, PolicySet

__all__ = ["COUNTER_CACHE_MAX", "GENESIS_HASH", "SCHEMA_VERSION", "Admission", "Checkpoint", "LogEntry", "Store",
           "iso", "utc_day", "utc_now"]

T = TypeVar("T")
# the writer's job and transaction under their earlier names (tests and benchmarks submit jobs directly)
_Job = Job
_Txn = Txn
_State = State


class Store:
    """Quota ledger + decision log. Open with ``Store.open(db)`` (a SQLite path or a ``postgresql://`` URL); close
    with ``close()`` (or a with-block)."""

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
        ``<db>.witness.jsonl``; none for ``:memory:``, nor by default for PostgreSQL, where each replica names its
        own)."""
        self.db = str(path)  # as given: a SQLite path or a PostgreSQL URL
        self.backend = open_backend(path)
        self.label = self.backend.label
        conn = self.backend.connect()
        try:
            migrate(conn)
            self.signer = self._load_signer(conn, signer)
        except BaseException:
            conn.close()
            self.backend.close()
            raise
        sidecar = self.backend.sidecar
        witness_path = witness or (default_witness_path(sidecar) if sidecar is not None else None)
        if witness_path is None and is_postgres(self.db):
            witness_path = default_witness_path("") if _env_witness() else None
        self.witness = None if witness_path is None else WitnessFile(witness_path)
        self.checkpoint_every = checkpoint_every
        self.reservation_ttl_s = reservation_ttl_s
        self.batch_max = batch_max
        self.lazy_commit_s = lazy_commit_s
        self._local = threading.local()
        self._readers: list[Conn] = []
        self._readers_lock = threading.Lock()
        self._writer = Writer(self.backend, conn, self, self.witness, batch_max=batch_max,
                              lazy_commit_s=lazy_commit_s)

    @classmethod
    def open(cls, path: str | Path, **kwargs: Any) -> Store:
        return cls(path, **kwargs)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _state(self) -> State | None:
        """The writer's cache (tests check it stays bounded)."""
        return self._writer.state

    # -- the signing key ----------------------------------------------------------------------------------------
    def _load_signer(self, conn: Conn, signer: Signer | None) -> Signer:
        """The key that signs this log. A log with entries is signed by the key named in its first entry (or, for
        a log written before entries named it, the key recorded in ``meta``); a missing or different key file is
        refused, never replaced, since every later checkpoint would then fail verification for ever."""
        key_path = _key_path(self.db, self.backend.sidecar)
        first = conn.execute("SELECT body FROM log WHERE idx = 0").fetchone()
        recorded = conn.execute("SELECT value FROM meta WHERE key='public_key'").fetchone()
        recorded_pem = None if recorded is None else _text(recorded[0])
        if first is not None:
            recorded_pem = log_key_pem(first[0]) or recorded_pem
        if signer is None:
            if first is not None and not key_path.exists():
                raise IntegrityError(
                    f"the decision log {self.label} has entries, but its signing key {key_path} is missing",
                    hint=f"restore {key_path} from the backup of this store (or point $DISTILLGATE_SIGNING_KEY at "
                         "it); distillgate never creates a new key for a log that has entries")
            signer = Signer.load_or_create(key_path)
        if first is not None and recorded_pem is not None and recorded_pem.strip() != signer.public_key_pem().strip():
            raise IntegrityError(
                f"the signing key {key_path} (key {signer.key_id}) is not the key the decision log {self.label} was "
                "started with (recorded in its first entry)",
                hint=f"restore the original {key_path} (or point $DISTILLGATE_SIGNING_KEY at it); `distillgate audit "
                     "verify` shows the recorded key")
        if first is None and recorded_pem != signer.public_key_pem():  # nothing signed yet: this key starts the log
            conn.execute(META_UPSERT, ("public_key", signer.public_key_pem().encode()))
        return signer

    # -- connections ----------------------------------------------------------------------------------------------
    def _reader(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None and conn.broken:  # PostgreSQL restarted: a fresh connection
            conn = None
        if conn is None:
            conn = self.backend.connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    # -- the writer -----------------------------------------------------------------------------------------------
    def _submit(self, job: Job) -> None:
        self._writer.submit(job)

    def _call(self, fn: Callable[[Txn], T]) -> T:
        fut: Future[T] = Future()
        self._submit(Job(fn, fut))
        return fut.result()

    def _asubmit(self, fn: Callable[[Txn], T], *, lazy: bool = False,
                 settles: str | None = None) -> asyncio.Future[T]:
        """Hand ``fn`` to the writer now; the future (of the running loop) resolves after its COMMIT."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._writer.submit(Job(fn, fut, None, loop, lazy, None, settles))
        return fut

    async def _acall(self, fn: Callable[[Txn], T], *, lazy: bool = False, settles: str | None = None) -> T:
        return await self._asubmit(fn, lazy=lazy, settles=settles)

    def close(self) -> None:
        if self._writer.closed:
            return
        self._writer.close()
        if self.witness is not None:
            self.witness.close()
        self.backend.close()
        with self._readers_lock:
            for conn in self._readers:
                with contextlib.suppress(Exception):  # the server may have dropped it already
                    conn.close()
            self._readers.clear()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _signed_checkpoint(self, frontier: Frontier) -> Checkpoint:
        payload = {"tree_size": frontier.size, "root_hash": frontier.root(), "ts": iso_now(),
                   "key_id": self.signer.key_id}
        return Checkpoint(signature=self.signer.sign_json(payload), **payload)  # type: ignore[arg-type]

    def checkpoint(self) -> Checkpoint:
        """Write a signed checkpoint of the current tree now (on demand)."""

        def job(txn: Txn) -> Checkpoint:
            cp = self._signed_checkpoint(txn.frontier)
            txn.add_checkpoint(cp)
            return cp

        return self._call(job)

    # -- decisions and quotas -------------------------------------------------------------------------------------
    def _admit_job(self, policies: Policy | PolicySet, request: Request, request_hash: str | None,
                   key_id: str | None, content: Any, extra: Mapping[str, Any] | None) -> Callable[[Txn], Admission]:
        def job(txn: Txn) -> Admission:
            policy = policies.select(request.project) if isinstance(policies, PolicySet) else policies
            day = txn.day  # utc_day(txn.now)
            project, user, run, kind = request.project, request.user, request.run, request.kind
            # with the run's owner: a run belongs to one project, decided in this transaction (two cannot both claim it)
            usage = txn.usage(project, user, run, day)
            decision = decide(policy, request, usage)
            allowed = decision.allowed
            tokens_requested, records_requested = request.tokens_requested, request.records_requested
            reservation_id = None
            tokens = records = 0
            if allowed and kind == "inference":
                reservation_id = os.urandom(16).hex()  # 128 random bits, as many hex digits as uuid4().hex
                tokens, records = tokens_requested, records_requested
                txn.apply(project, user, run, day, tokens, records)
            fields: dict[str, Any] = {
                "policy_id": decision.policy_id,
                "policy_hash": decision.policy_hash,
                "user": user,
                "project": project,
                "run": run,
                "model": request.model,
                "output_type": request.output_type,
                "request_kind": kind,
                "decision": "allow" if allowed else "deny",
                "reasons": list(decision.reasons),
                "message": decision.message,
                "tokens_requested": tokens_requested,
                "records_requested": records_requested,
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
            if not allowed:  # anyone can be denied: what they sent is stored bounded (ledger/entries.py)
                fields = bound_denial(fields, authenticated=request.auth == "ok")
            entry = txn.append("decision", fields)
            if allowed and kind == "inference" and run and project and usage.run_project is None:
                txn.claim_run(run, project, entry.index)
            if reservation_id is not None:
                txn.add_reservation(reservation_id, entry.index, project, user, run, day, tokens, records)
            return Admission.quick(decision, entry, reservation_id, tokens, records)

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
        forwarding an allowed request before its commit, but must await the second value before it tells the
        client anything: a client never learns of a decision that is not in the log. The transaction of an allowed
        one stays open (up to ``lazy_commit_s``) until its settlement comes or the second value is awaited, so that
        both commit together (ledger/writer.py).
        """
        loop = asyncio.get_running_loop()
        early: asyncio.Future[Admission] = loop.create_future()
        job = Job(self._admit_job(policies, request, request_hash, key_id, content, extra), None, early, loop,
                  hold=_held_reservation)
        durable: Durable[Admission] = Durable(self._writer, job, loop=loop)
        job.done = durable
        self._writer.submit(job)
        try:
            return await early, durable
        except BaseException:
            durable.cancel()
            raise

    def _settle_job(self, reservation_id: str, prompt_tokens: int | None, completion_tokens: int | None,
                    records: int | None, response_hash: str | None, upstream_id: str | None, outcome: str,
                    reasons: tuple[str, ...], extra: Mapping[str, Any] | None) -> Callable[[Txn], LogEntry]:
        def job(txn: Txn) -> LogEntry:
            res = txn.reservation(reservation_id)
            if res is None:
                raise NotFoundError(f"no reservation {reservation_id!r}")
            c = charge(res, outcome=outcome, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       records=records, reasons=reasons)
            project, user, run, t_res = res.project, res.user, res.run, res.tokens_reserved
            tokens_charged, records_charged = c.tokens_charged, c.records_charged
            txn.apply(project, user, run, res.day, *c.counter_deltas(res))
            txn.close_reservation(reservation_id, c.state, tokens_charged, records_charged, res)
            fields: dict[str, Any] = {
                "reservation_id": reservation_id, "decision_index": res.decision_index, "project": project,
                "user": user, "run": run, "outcome": outcome, "reasons": list(c.reasons),
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "tokens_reserved": t_res, "tokens_charged": tokens_charged, "tokens_refunded": t_res - tokens_charged,
                "records_charged": records_charged, "response_hash": response_hash, "upstream_id": upstream_id,
            }
            if c.overrun:
                fields["tokens_overrun"] = c.overrun
            if c.late:
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
                                                  response_hash, upstream_id, outcome, reasons, extra), lazy=lazy,
                                 settles=reservation_id)

    def submit_settle(self, reservation_id: str, *, prompt_tokens: int | None = None,
                      completion_tokens: int | None = None, records: int | None = None,
                      response_hash: str | None = None, upstream_id: str | None = None, outcome: str = "ok",
                      reasons: tuple[str, ...] = (), extra: Mapping[str, Any] | None = None,
                      lazy: bool = False) -> asyncio.Future[LogEntry]:
        """``asettle``, handed to the writer at once (call it in the event loop): the returned future resolves
        once the settlement is durable, and the caller can do other work meanwhile (sign the answer's stamp while
        the commit's fsync runs)."""
        return self._asubmit(self._settle_job(reservation_id, prompt_tokens, completion_tokens, records,
                                              response_hash, upstream_id, outcome, reasons, extra), lazy=lazy,
                             settles=reservation_id)

    def _reclaim_job(self, now: float | None) -> Callable[[Txn], int]:
        def job(txn: Txn) -> int:
            cutoff = time.time() if now is None else now
            rows = txn.conn.execute(
                f"SELECT {Reservation.COLUMNS} FROM reservations WHERE state='held' AND expires < ?", (cutoff,),
            ).fetchall()
            # the table is as last committed; this transaction may have settled some of them already
            held = [res for r in rows if (res := txn.reservation(r[0]) or Reservation(*r)).state == "held"]
            for res in held:
                txn.apply(res.project, res.user, res.run, res.day, -res.tokens_reserved, -res.records_reserved)
                txn.close_reservation(res.id, "expired", 0, 0)
                txn.append("reclaim", {
                    "reservation_id": res.id, "decision_index": res.decision_index, "project": res.project,
                    "user": res.user, "run": res.run, "reasons": ["RESERVATION_EXPIRED"],
                    "tokens_refunded": res.tokens_reserved, "records_refunded": res.records_reserved,
                })
            return len(held)

        return job

    def _extend_job(self, reservation_ids: Sequence[str]) -> Callable[[Txn], int]:
        def job(txn: Txn) -> int:
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
        keys = usage_keys(project, user, run, day or utc_day())
        found = read_counters(self._reader(), keys)
        return as_usage([found[k] for k in keys])

    def run_tokens(self, project: str, run: str) -> int:
        key = run_key(project, run)
        return read_counters(self._reader(), [key])[key][0]

    def size(self) -> int:
        row = self._reader().execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM log").fetchone()
        return int(row[0])

    def entries(self, *, run: str | None = None, start: int = 0, kind: str | None = None,
                project: str | None = None) -> Iterator[LogEntry]:
        """Entries from ``start``, optionally of one run (of one project) and one kind. The run is selected on the
        hashed body itself (an index over its ``run`` field) and the rest of a run's slice from the body, so no edited
        column can move a row in or out of a run's slice (or export). Without a run, the ``kind`` and ``project``
        columns narrow the scan and every selected row is re-checked against its body (see ledger/entries.py)."""
        conn = self._reader()
        sql = "SELECT idx, entry_hash, body FROM log WHERE idx >= ?"
        args: list[Any] = [start]
        wanted = {"run": run, "kind": kind, "project": project}
        if run is not None:
            sql += f" AND {conn.dialect.body_run} = ?"
            args.append(run)
        for name in ("kind", "project"):
            if wanted[name] is not None and run is None:
                sql += f" AND {name} = ?"
                args.append(wanted[name])
        for idx, entry_hash, body in conn.execute(sql + " ORDER BY idx", args).fetchall():
            parsed = orjson.loads(bytes(body))
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
        return LogEntry(int(row[0]), str(row[1]), orjson.loads(bytes(row[2])))

    def entry_hashes(self, size: int | None = None) -> list[str]:
        sql = "SELECT entry_hash FROM log ORDER BY idx"
        rows = self._reader().execute(sql if size is None else sql + " LIMIT ?", () if size is None else (size,))
        return [str(r[0]) for r in rows.fetchall()]

    def head(self) -> Checkpoint | None:
        row = self._reader().execute("SELECT value FROM meta WHERE key='head'").fetchone()
        return None if row is None else Checkpoint(**orjson.loads(bytes(row[0])))

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


def _held_reservation(admission: Admission) -> str | None:
    """What an early admission's transaction may wait for: the settlement of its reservation (an allowed inference;
    a denial, or an allowed request that reserves nothing, is answered at once)."""
    return admission.reservation_id


def _text(value: Any) -> str:
    return bytes(value).decode() if isinstance(value, bytes | memoryview) else str(value)


def _env_witness() -> bool:
    return bool(os.environ.get("DISTILLGATE_WITNESS"))


def _key_path(db: str, sidecar: Path | None) -> Path:
    """``$DISTILLGATE_SIGNING_KEY``, else ``<db>.signing-key.pem`` beside a SQLite file; a PostgreSQL store has no
    file beside it, so every replica must be given the same key file."""
    if sidecar is not None or _env_key():
        return default_key_path(sidecar if sidecar is not None else db)
    raise UserError("a PostgreSQL store needs its signing key file named: set $DISTILLGATE_SIGNING_KEY",
                    hint="point $DISTILLGATE_SIGNING_KEY at one key file (it is made if missing) and give every "
                         "replica the same file; see docs/deploy.md")


def _env_key() -> bool:
    return bool(os.environ.get("DISTILLGATE_SIGNING_KEY"))
