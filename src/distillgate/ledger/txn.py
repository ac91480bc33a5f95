"""One write transaction over the writer's cached state, with per-job undo.

``State`` is what the writer knows between transactions (chain head, Merkle frontier, quota counters, held
reservations, run owners). It is valid while the backend's version is unchanged (see ledger/backend.py); the writer
reloads it inside the write lock when another process wrote in between.

``Txn``: jobs read and change the cached state; their rows are buffered and written with one ``executemany`` per
table in ``finish`` (the same transaction, so still all-or-nothing). Each job can be undone on its own
(``mark``/``undo``): a failing job leaves no row and no trace in the caches.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson

from distillgate.canonical import CANONICAL_OPTS
from distillgate.db import Conn
from distillgate.errors import IntegrityError, InternalError
from distillgate.ledger.entries import columns
from distillgate.ledger.merkle import Frontier
from distillgate.ledger.records import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    Checkpoint,
    LogEntry,
    Reservation,
    iso_now,
    utc_day,
    utc_now,
)
from distillgate.ledger.signing import Signer
from distillgate.policy.decision import Usage

_dumps = orjson.dumps
_new = object.__new__
_sha256 = hashlib.sha256
_MISSING = object()
_COUNTER_CHANGES: dict[Any, Any] = {}  # marks an undo record of ``apply`` (its changes and the values they changed)
CounterKey = tuple[str, str, str]  # (scope, key, day) of a row of the counters table

LOG_INSERT = 'INSERT INTO log (idx, entry_hash, body, kind, ts, run, project, "user") VALUES (?,?,?,?,?,?,?,?)'
META_UPSERT = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
#: the frontier and the signed head, in one statement (two rows)
META_UPSERT_HEAD = ("INSERT INTO meta (key, value) VALUES ('frontier', ?), ('head', ?) ON CONFLICT (key) DO UPDATE "
                    "SET value = excluded.value")
CHECKPOINT_UPSERT = ("INSERT INTO checkpoints (tree_size, root_hash, ts, key_id, signature) VALUES (?,?,?,?,?) "
                     "ON CONFLICT (tree_size) DO UPDATE SET root_hash = excluded.root_hash, ts = excluded.ts, "
                     "key_id = excluded.key_id, signature = excluded.signature")


class Signs(Protocol):
    """What a transaction needs of its store."""

    signer: Signer
    checkpoint_every: int
    reservation_ttl_s: float

    def _signed_checkpoint(self, frontier: Frontier) -> Checkpoint: ...


def run_key(project: str | None, run: str | None) -> CounterKey:
    return ("run", f"{project}\x1f{run}", "")


def usage_keys(project: str | None, user: str | None, run: str | None, day: str) -> list[CounterKey]:
    """The counters ``decide`` reads: the project's and the user's tokens today, the run's records."""
    return [("project", project or "", day), ("user", user or "", day), run_key(project, run)]


def read_counters(conn: Conn, keys: Sequence[CounterKey]) -> dict[CounterKey, list[int]]:
    """[tokens, records] of each key as committed ([0, 0] for a key with no row)."""
    found = {(sc, k, d): [int(t), int(r)] for sc, k, d, t, r in conn.execute(
        "SELECT scope, key, day, tokens, records FROM counters WHERE (scope, key, day) IN ("
        + ",".join("(?,?,?)" for _ in keys) + ")", [v for key in keys for v in key]).fetchall()}
    return {k: found.get(k, [0, 0]) for k in keys}


def as_usage(counters: Sequence[list[int]], run_project: str | None = None) -> Usage:
    project, user, run = counters
    # Usage(...) without the frozen __init__ (one object.__setattr__ per field): one per admission
    out = _new(Usage)
    out.__dict__.update(tokens_today_project=project[0], tokens_today_user=user[0], records_run=run[1],
                        run_project=run_project)
    return out


def log_key_pem(body: bytes | memoryview | None) -> str | None:
    """The public key a log's first entry names (None: no entry, or one written before entries named it)."""
    if body is None:
        return None
    log_key = orjson.loads(bytes(body)).get("log_key") or {}
    pem = log_key.get("public_key_pem")
    return None if pem is None else str(pem)


class State:
    def __init__(self, conn: Conn, version: int, signer: Signer) -> None:
        row = conn.execute("SELECT idx, entry_hash FROM log ORDER BY idx DESC LIMIT 1").fetchone()
        self.next_index = 0 if row is None else int(row[0]) + 1
        self.prev_hash = GENESIS_HASH if row is None else str(row[1])
        fr = conn.execute("SELECT value FROM meta WHERE key='frontier'").fetchone()
        self.frontier = Frontier.from_json(orjson.loads(bytes(fr[0]))) if fr else Frontier()
        if self.frontier.size != self.next_index:
            raise InternalError(
                f"Merkle frontier size {self.frontier.size} != log size {self.next_index}",
                hint="the database was modified outside distillgate; run `distillgate audit verify`",
            )
        if row is not None:  # another process may have started the log since this one opened: same key?
            first = conn.execute("SELECT body FROM log WHERE idx = 0").fetchone()
            pem = log_key_pem(None if first is None else first[0])
            if pem is not None and pem.strip() != signer.public_key_pem().strip():
                raise IntegrityError(
                    f"this process signs with key {signer.key_id}, but the decision log was started with another "
                    "key (named in its first entry)",
                    hint="give every process (every replica) the same signing key file: $DISTILLGATE_SIGNING_KEY")
        self.version = version
        #: (scope, key, day) -> [tokens, records], as committed plus this transaction's changes
        self.counters: dict[CounterKey, list[int]] = {}
        self.reservations: dict[str, Reservation] = {}
        #: run id -> the project that owns it (None: nobody yet), as committed plus this transaction's claims
        self.runs: dict[str, str | None] = {}


class Txn:
    def __init__(self, conn: Conn, store: Signs, state: State) -> None:
        self.conn = conn
        self.store = store
        self.state = state
        self.now = utc_now()
        self.day = utc_day(self.now)  # the UTC day of ``now`` (each admission's quota day)
        self.appended = 0
        self.head: Checkpoint | None = None  # the signed head ``finish`` wrote (for the witness)
        self.head_json = b""  # ... and its JSON, as stored in ``meta``
        self.checkpoints: list[Checkpoint] = []
        self._log: list[tuple[Any, ...]] = []
        self._runs: list[tuple[Any, ...]] = []
        #: rows of reservations made in this transaction (settled in it too: written once, with their outcome)
        self._new_reservations: list[tuple[Any, ...]] = []
        self._new_at: dict[str, int] = {}  # reservation id -> its row in ``_new_reservations``
        self._reservation_updates: list[tuple[Any, ...]] = []
        self._deltas: dict[CounterKey, list[int]] = {}
        #: (mapping or list, key, previous value or _MISSING)
        self._undo: list[tuple[Any, Any, Any]] = []

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
        fr = s.frontier
        return (s.next_index, s.prev_hash, fr.size, fr.nodes[:], self.appended, len(self._log), len(self.checkpoints),
                len(self._new_reservations), len(self._reservation_updates), len(self._runs), len(self._undo))

    def undo(self, mark: tuple[Any, ...]) -> None:
        s = self.state
        (s.next_index, s.prev_hash, size, nodes, self.appended, n_log, n_cp, n_new, n_upd, n_runs, n_undo) = mark
        s.frontier = Frontier(size, nodes)
        while len(self._undo) > n_undo:  # first: it may restore rows of ``_new_reservations`` cut off below
            mapping, key, old = self._undo.pop()
            if mapping is _COUNTER_CHANGES:  # see ``apply``
                for (counter, t, r), value in zip(key, old, strict=True):
                    value[0] -= t
                    value[1] -= r
                    d = self._deltas[counter]
                    d[0] -= t
                    d[1] -= r
            elif old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old
        del self._log[n_log:], self.checkpoints[n_cp:], self._new_reservations[n_new:]
        del self._reservation_updates[n_upd:], self._runs[n_runs:]

    def _remember(self, mapping: dict[Any, Any], key: Any) -> None:
        old = mapping.get(key, _MISSING)
        self._undo.append((mapping, key, list(old) if isinstance(old, list) else old))

    # -- the log ------------------------------------------------------------------------------------------------
    def append(self, kind: str, fields: Mapping[str, Any]) -> LogEntry:
        s = self.state
        index = s.next_index
        ts = iso_now()
        prev_hash = s.prev_hash
        body = {
            **fields,
            "schema_version": SCHEMA_VERSION,
            "index": index,
            "ts": ts,
            "kind": kind,
            "prev_hash": prev_hash,
        }
        if index == 0:  # the log's first entry names the key that signs it (see Store._load_signer)
            signer = self.store.signer
            body["log_key"] = {"key_id": signer.key_id, "public_key_pem": signer.public_key_pem()}
        data = _dumps(body, option=CANONICAL_OPTS)  # canonical_json(body), without the call
        digest = _sha256(data)
        entry_hash = digest.hexdigest()
        self._log.append((index, entry_hash, data, *columns(body)))
        frontier = s.frontier
        frontier.append_digest(digest.digest())
        s.next_index = index + 1
        s.prev_hash = entry_hash
        self.appended += 1
        every = self.store.checkpoint_every
        if every and frontier.size % every == 0:
            self.add_checkpoint(self.store._signed_checkpoint(frontier))
        return LogEntry.quick(index, entry_hash, body)

    def add_checkpoint(self, cp: Checkpoint) -> None:
        self.checkpoints.append(cp)

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
        try:
            return [cache[k] for k in keys]
        except KeyError:  # a read fills the cache with committed values: no undo needed
            cache.update(read_counters(self.conn, [k for k in keys if k not in cache]))
            return [cache[k] for k in keys]

    def usage(self, project: str | None, user: str | None, run: str | None, day: str) -> Usage:
        """The counters ``decide`` reads and, for a request in a run, the project that owns the run."""
        return as_usage(self.counters(usage_keys(project, user, run, day)), self.run_owner(run) if run else None)

    def apply(self, project: str | None, user: str | None, run: str | None, day: str, tokens: int,
              records: int) -> None:
        changes: list[tuple[CounterKey, int, int]] = []
        if project is not None:
            changes.append((("project", project, day), tokens, 0))
            if run is not None:
                changes.append((run_key(project, run), tokens, records))
        if user is not None:
            changes.append((("user", user, day), tokens, 0))
        if not changes:
            return
        values = self.counters([k for k, _, _ in changes])  # read before any change: a failed read leaves no undo
        deltas = self._deltas
        for (key, t, r), value in zip(changes, values, strict=True):
            value[0] += t
            value[1] += r
            d = deltas.get(key)
            if d is None:
                deltas[key] = [t, r]
            else:
                d[0] += t
                d[1] += r
        # undone by subtracting the same amounts (undo runs newest first), not by copies of each value: the
        # counter lists are the ones the cache holds, so this is exact; a delta left at [0, 0] writes no row
        self._undo.append((_COUNTER_CHANGES, changes, values))

    # -- reservations -------------------------------------------------------------------------------------------
    def reservation(self, reservation_id: str) -> Reservation | None:
        cache = self.state.reservations
        res = cache.get(reservation_id)
        if res is None:
            row = self.conn.execute(f"SELECT {Reservation.COLUMNS} FROM reservations WHERE id=?",
                                    (reservation_id,)).fetchone()
            if row is not None:
                cache[reservation_id] = res = Reservation(*row)
        return res

    def add_reservation(self, reservation_id: str, decision_index: int, project: str | None, user: str | None,
                        run: str | None, day: str, tokens: int, records: int) -> None:
        created = time.time()
        new_at, reservations = self._new_at, self.state.reservations
        self._remember(new_at, reservation_id)
        self._remember(reservations, reservation_id)
        new_at[reservation_id] = len(self._new_reservations)
        self._new_reservations.append((reservation_id, decision_index, project, user, run, day, tokens, records,
                                       None, None, "held", created, created + self.store.reservation_ttl_s))
        reservations[reservation_id] = Reservation.quick(reservation_id, decision_index, project, user, run, day,
                                                         tokens, records, "held")

    def close_reservation(self, reservation_id: str, state: str, tokens_charged: int, records_charged: int,
                          res: Reservation | None = None) -> None:
        """``res``: the reservation, when the caller has just read it (``reservation(reservation_id)``)."""
        if res is None:
            res = self.reservation(reservation_id)
        assert res is not None
        at = self._new_at.get(reservation_id)
        if at is None:
            self._reservation_updates.append((state, tokens_charged, records_charged, reservation_id))
        else:  # made in this transaction: its one INSERT carries the outcome (the same row as INSERT + UPDATE)
            row = self._new_reservations[at]
            self._undo.append((self._new_reservations, at, row))
            self._new_reservations[at] = (*row[:8], tokens_charged, records_charged, state, *row[11:])
        reservations = self.state.reservations
        self._remember(reservations, reservation_id)
        reservations[reservation_id] = res.with_state(state)

    # -- commit -------------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Write the buffered rows (inside the open transaction); the caller commits."""
        conn = self.conn
        if self._log:
            conn.executemany(LOG_INSERT, self._log)
        if self._runs:
            conn.executemany("INSERT INTO runs (run, project, decision_index) VALUES (?,?,?)", self._runs)
        if self._new_reservations:
            conn.executemany(
                'INSERT INTO reservations (id, decision_index, project, "user", run, day, tokens_reserved, '
                "records_reserved, tokens_charged, records_charged, state, created, expires) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", self._new_reservations)
        if self._reservation_updates:
            conn.executemany("UPDATE reservations SET state=?, tokens_charged=?, records_charged=? WHERE id=?",
                             self._reservation_updates)
        deltas = [(sc, k, d, t, r) for (sc, k, d), (t, r) in self._deltas.items() if t or r]
        if deltas:
            conn.executemany(
                "INSERT INTO counters (scope, key, day, tokens, records) VALUES (?,?,?,?,?) ON CONFLICT (scope, key, "
                "day) DO UPDATE SET tokens = counters.tokens + excluded.tokens, "
                "records = counters.records + excluded.records", deltas)
        if self.checkpoints:
            conn.executemany(CHECKPOINT_UPSERT, [cp.row() for cp in self.checkpoints])
        if not self.appended:
            return
        frontier = self.state.frontier
        head = self.head = self.store._signed_checkpoint(frontier)
        self.head_json = orjson.dumps(head.as_dict())  # the witness line too (ledger/witness.py: the same fields)
        conn.execute(META_UPSERT_HEAD, (orjson.dumps(frontier.to_json()), self.head_json))
        # closed reservations are settled for good: keep the cache small
        cache = self.state.reservations
        for _, _, _, rid in self._reservation_updates:
            cache.pop(rid, None)
        for row in self._new_reservations:
            if row[10] != "held":
                cache.pop(row[0], None)
