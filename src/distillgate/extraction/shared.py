"""``SharedWindows``: one extraction monitor's view shared with every other gateway process on the same store.

Each gateway process (a ``--workers`` worker, or a replica on one PostgreSQL) keeps its own ``ExtractionMonitor``;
alone, its windows would see only the requests that landed on it, and an attacker spreading traffic over workers
or replicas would stay under every threshold. So each process

- **publishes** what it observed: on the request path ``publish(sketch)`` only appends the sketch to an in-memory
  outbox; its ``share_record`` (the decision log's features record plus the word set as hashes) is built and
  encoded off the request path. Once its embedder has read the request's prompt, the embedder's thread publishes
  the pieces too (``Embedded``: their int8 vector codes, 64-bit hashes and scopes), so that the content signals
  (``prompt_drift``, ``distribution_shift``, ``embedding_mmd``) see every process's pieces without embedding the
  text again;
- a background thread, every ``interval_s``, **flushes** the outbox to ``monitor_events`` (the store's table,
  migration m008, on PostgreSQL; a file of its own next to a SQLite store, see below) in one transaction, and
- **pulls** the rows other processes wrote since its cursor, in ``seq`` order, and applies each to its own monitor
  exactly as a local request would be (``ExtractionMonitor.absorb``).

A decision therefore judges the merged view: every request this process saw, and every request another process
saw up to **staleness = 2 x ``interval_s`` + two commits** before (the other's next round commits it, ours reads
it at our next round; 0.2 s plus a few ms by default, see docs/deploy.md). A request inside that bound may be
judged without the other process's last few events; nothing is lost, they apply a moment later. Embedded pieces
leave once embedded: their bound adds the other's embedder latency (its queue, then the model), as their effect
on the process that embedded them waits for it too.

Each piece counts once everywhere. A process applies its own pieces when it embeds them, through the same int8
codes it publishes (every process applies bit-identical vectors), and its pull skips its own origin. While a
project has no reference yet (none configured; the first ``reference_size`` pieces become it) the publisher
applies nothing itself: it writes the pieces under ``origin + "/deferred"``, which its pull does not skip, so they
come back to it in ``seq`` order as they reach every other process, and every process builds the bootstrap
reference of the same pieces (whether they may shape it is the publisher's judgement, in the row). A process
that starts after the reference was built, beyond its ``backfill``, builds its own from what follows.

Order: rows get their ``seq`` under the write lock (SQLite's flock + ``BEGIN IMMEDIATE``, a PostgreSQL advisory
lock), so a row with a smaller ``seq`` is always committed before one with a larger: a cursor never skips a row.
A process (re)started reads the last ``backfill`` rows first, so a restarted worker keeps its users' windows.
The table keeps the last ``retain`` rows. Commits here need no fsync (SQLite ``synchronous=NORMAL`` under WAL,
PostgreSQL ``synchronous_commit=off``): a lost tail of monitor events weakens detection for a moment, never a
decision already logged.

Where the rows live: on PostgreSQL, the store's ``monitor_events`` table (its commits bump no ``write_head``
generation, so no replica's ledger cache reloads for them). On SQLite, a file of its own next to the store
(:func:`events_path`: ``STORE.monitor-events.sqlite3``, same table): every commit to the store's own file changes
its ``PRAGMA data_version`` and makes each ledger writer on it reload its cached counters and chain head, and the
flush would take the store's write lock from the decision path; a separate file costs neither (docs/deploy.md). SQLite's own write lock (``BEGIN IMMEDIATE``) orders the
sidecar's ``seq`` the same way.

The rows hold what the decision log's features record holds (a MinHash, lengths, fingerprints, ids) plus the
64-bit hashes of the prompt's words (never the words); a pieces row, int8 codes of the pieces' unit embeddings
(one byte per dimension), the 64-bit hashes of the pieces and the scopes they apply to (never the text).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from distillgate.extraction.features import Embedded, Sketch

if TYPE_CHECKING:
    from distillgate.extraction.monitor import ExtractionMonitor

_log = logging.getLogger("distillgate.extraction")
#: PostgreSQL advisory lock serialising monitor_events inserts (any constant; "dgmon" in ASCII)
SHARE_LOCK = 0x6467_6D6F6E
PULL_BATCH = 2000
MAX_OUTBOX = 50_000  # rows kept while the store is unreachable; older ones are dropped (and counted)


EVENTS_SQL = ("CREATE TABLE IF NOT EXISTS monitor_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
              "origin TEXT NOT NULL, at REAL NOT NULL, record BLOB NOT NULL)")


def events_path(db: str) -> str | None:
    """The SQLite file that holds a SQLite store's shared monitor events; None for PostgreSQL (the store's table)."""
    from distillgate.db import is_postgres

    return None if is_postgres(db) else f"{db}.monitor-events.sqlite3"


class SharedWindows:
    """See the module docstring. Thread-safe ``publish``; ``close`` flushes what is queued."""

    def __init__(self, monitor: ExtractionMonitor, db: str, *, interval_s: float = 0.1, backfill: int = 10_000,
                 retain: int = 200_000, start: bool = True) -> None:
        self.monitor = monitor
        self.db = db
        self.interval_s = interval_s
        self.backfill = backfill
        self.retain = retain
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: the origin of the pieces this process left for the stream to apply (its pull reads them back)
        self.deferred_origin = f"{self.origin}/deferred"
        self.cursor: int | None = None
        self.published = 0  # rows this process committed
        self.applied = 0  # other processes' rows applied here (and this one's deferred pieces)
        self.applied_embedded = 0  # ... of which embedded pieces
        self.lost = 0  # rows dropped from a full outbox (store unreachable for long)
        self.errors = 0
        self.synced_at = 0.0  # monotonic time the last pull finished
        self._outbox: deque[tuple[str, Sketch | Embedded | bytes]] = deque()  # (origin, what to share)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._backend: Any = None
        self._conn: Any = None
        self._since_prune = 0
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="distillgate-extraction-share", daemon=True)
            self._thread.start()

    # -- the request path ---------------------------------------------------------------------------------------------
    def publish(self, item: Sketch | Embedded, *, deferred: bool = False) -> None:
        """Queue a judged request's sketch (the request path) or its embedded pieces (the embedder's thread).
        ``deferred``: pieces this process did not apply (its project has no reference yet); they are written under
        :attr:`deferred_origin`, so that this process reads them back and applies them in ``seq`` order too."""
        # the record is built and encoded by the flush, off the request path (a sketch does not change)
        with self._lock:
            self._outbox.append((self.deferred_origin if deferred else self.origin, item))
            while len(self._outbox) > MAX_OUTBOX:
                self._outbox.popleft()
                self.lost += 1

    # -- the background thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.sync()
                failures = 0
            except Exception as exc:  # the store is away: keep the outbox, reconnect on the next round
                self.errors += 1
                failures += 1
                if failures == 1:
                    _log.warning("extraction monitor: cannot share windows through the store: %s", exc)
                self._drop_conn()
                self._stop.wait(min(2.0, self.interval_s * 2 ** min(failures, 6)))
                continue
            # one round per interval, not per publish: commits stay at most 1 / interval_s whatever the load
            self._stop.wait(self.interval_s)

    def sync(self) -> None:
        """One round: flush the outbox, then apply what the other processes wrote since the cursor."""
        conn = self._connection()
        self._flush(conn)
        self._pull(conn)
        self.synced_at = time.monotonic()

    def _connection(self) -> Any:
        if self._conn is not None and not self._conn.broken:
            return self._conn
        from distillgate.db import connect
        from distillgate.ledger.backend import open_backend
        from distillgate.ledger.schema import migrate

        self._drop_conn()
        sidecar = events_path(self.db)
        if sidecar is not None:
            conn = connect(sidecar)  # a missing directory is the store's NotFoundError, said for the sidecar
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(EVENTS_SQL)
        else:
            self._backend = open_backend(self.db)
            conn = self._backend.connect()
            migrate(conn)
            conn.execute("SET synchronous_commit = off")
        self._conn = conn
        if self.cursor is None:  # a fresh process starts from the recent past: the windows it would have had
            (top,) = conn.execute("SELECT coalesce(max(seq), 0) FROM monitor_events").fetchone()
            self.cursor = max(0, int(top) - self.backfill)
        return conn

    def _drop_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.rollback_quietly()
                self._conn.close()
            except Exception:
                pass
            self._conn = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _flush(self, conn: Any) -> None:
        with self._lock:
            queued = list(self._outbox)
            self._outbox.clear()
        rows = [(o, r if isinstance(r, bytes) else orjson.dumps(r.share_record())) for o, r in queued]
        if not rows:
            return
        now = time.time()
        try:
            with self._backend.write_lock() if self._backend is not None else contextlib.nullcontext():
                pg = conn.dialect.name == "postgres"
                conn.execute("BEGIN" if pg else "BEGIN IMMEDIATE")
                if pg:
                    conn.execute("SELECT pg_advisory_xact_lock(?)", (SHARE_LOCK,))
                conn.executemany("INSERT INTO monitor_events (origin, at, record) VALUES (?,?,?)",
                                 [(o, now, r) for o, r in rows])
                self._since_prune += len(rows)
                if self._since_prune >= 1000:
                    self._since_prune = 0
                    conn.execute("DELETE FROM monitor_events WHERE seq <= "
                                 "(SELECT max(seq) FROM monitor_events) - ?", (self.retain,))
                conn.execute("COMMIT")
        except BaseException:
            conn.rollback_quietly()
            with self._lock:  # put them back, oldest first, for the next round
                self._outbox.extendleft(reversed(rows))
            raise
        self.published += len(rows)

    def _pull(self, conn: Any) -> None:
        while True:
            got = conn.execute("SELECT seq, record FROM monitor_events WHERE seq > ? AND origin <> ? ORDER BY seq "
                               "LIMIT ?", (self.cursor, self.origin, PULL_BATCH)).fetchall()
            for seq, record in got:
                self.cursor = int(seq)
                try:
                    rec = orjson.loads(bytes(record))
                    item = Embedded.from_record(rec) if rec.get("kind") == "embedded" else Sketch.from_record(rec)
                except Exception as exc:  # a row of another release: skipped, said once per row
                    _log.warning("extraction monitor: skipped shared row %s: %s", seq, exc)
                    continue
                if isinstance(item, Embedded):
                    self.monitor.absorb_embedded(item)
                    self.applied_embedded += 1
                else:
                    self.monitor.absorb(item)
                self.applied += 1
            if len(got) < PULL_BATCH:
                return

    def close(self) -> None:
        """Stop the thread, flushing what is queued (one last try)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            try:
                self._flush(self._connection())
            except Exception as exc:
                _log.warning("extraction monitor: %d observed requests not shared at stop: %s",
                             len(self._outbox), exc)
        self._drop_conn()
