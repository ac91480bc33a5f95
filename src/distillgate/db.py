"""One SQL connection type over SQLite and PostgreSQL, so each query is written once.

``--db`` names either a SQLite file (a path) or a PostgreSQL database (``postgresql://user@host:port/db`` or
``postgres://...``). ``connect(db)`` returns a ``Conn``: ``execute``/``executemany`` take SQL in SQLite's spelling
(``?`` placeholders), which ``Conn`` rewrites for psycopg (``%s``) once per statement. The SQL distillgate writes
keeps to what both engines accept: ``INSERT ... ON CONFLICT (...) DO UPDATE/NOTHING`` (never ``INSERT OR
REPLACE``), row values in ``IN``, and the column ``"user"`` always quoted (a reserved word in PostgreSQL). What
cannot be spelled the same (column types, an expression over a JSON body) comes from ``Dialect``.

Both connections are in autocommit mode; a transaction is an explicit ``BEGIN`` ... ``COMMIT``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from distillgate.errors import NotFoundError, StoreUnavailable, UserError

PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(PG_SCHEMES)


def describe(db: str | Path) -> str:
    """``db`` for messages, with any password in a PostgreSQL URL masked."""
    if not is_postgres(db):
        return str(db)
    scheme, _, rest = str(db).partition("://")
    cred, at, host = rest.rpartition("@")
    if at and ":" in cred:
        cred = cred.split(":", 1)[0] + ":***"
    return f"{scheme}://{cred}{at}{host}"


@dataclass(frozen=True)
class Dialect:
    name: str  # "sqlite" | "postgres"
    blob: str  # column type of bytes
    real: str  # column type of a float
    bigint: str  # column type of a 64-bit integer
    #: an expression giving the ``run`` field of a JSON ``body`` column (bytes)
    body_run: str


SQLITE = Dialect("sqlite", "BLOB", "REAL", "INTEGER", "json_extract(CAST(body AS TEXT), '$.run')")
POSTGRES = Dialect("postgres", "BYTEA", "DOUBLE PRECISION", "BIGINT", "distillgate_body_run(body)")


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class Conn:
    """A DB-API connection of either engine with SQLite's placeholder style. Not thread-safe: one per thread."""

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self.raw = raw
        self.dialect = dialect
        self._pg = dialect.name == "postgres"

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        if self._pg:
            try:
                return self.raw.execute(_pg_sql(sql), args if args else None)
            except Exception as exc:
                self._raise_if_lost(exc)
                raise
        return self.raw.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        if self._pg:
            cur = self.raw.cursor()
            try:
                cur.executemany(_pg_sql(sql), list(rows))
            except Exception as exc:
                self._raise_if_lost(exc)
                raise
            return cur
        return self.raw.executemany(sql, rows)

    def _raise_if_lost(self, exc: Exception) -> None:
        """A lost server is ``StoreUnavailable`` (the gateway answers 503; the next use reconnects)."""
        if self.broken:
            raise StoreUnavailable(f"lost the connection to PostgreSQL: {str(exc).strip()}",
                                   hint="is the server up? the next request reconnects") from exc

    def script(self, sql: str) -> None:
        """Run ``;``-separated statements (DDL without string literals holding ``;``)."""
        for statement in sql.split(";"):
            if statement.strip():
                self.execute(statement)

    @property
    def in_transaction(self) -> bool:
        if self._pg:
            import psycopg

            return bool(self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)
        return bool(self.raw.in_transaction)

    @property
    def broken(self) -> bool:
        """The server went away (PostgreSQL restarted, network cut): reconnect before the next use."""
        return bool(self._pg and (self.raw.closed or self.raw.broken))

    def rollback_quietly(self) -> None:
        """End a failed transaction; a lost connection has nothing to roll back."""
        try:
            if self.in_transaction and not self.broken:
                self.execute("ROLLBACK")
        except Exception:  # the connection died too: the server rolled the transaction back
            pass

    def close(self) -> None:
        self.raw.close()


def connect(db: str | Path, *, timeout_s: float = 60.0) -> Conn:
    """An autocommit connection to ``db`` (a SQLite path or a PostgreSQL URL); clear errors for both."""
    if is_postgres(db):
        return _connect_pg(str(db), timeout_s)
    path = Path(db)
    if str(db) != ":memory:" and not path.parent.exists():
        raise NotFoundError(f"directory of --db {path} does not exist", hint="create it or choose another path")
    try:
        raw = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=timeout_s)
        _wal(raw, timeout_s)
        raw.execute("PRAGMA synchronous=FULL")
        raw.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    except sqlite3.DatabaseError as exc:
        raise UserError(f"cannot open store {path}: {exc}", hint="is --db a distillgate SQLite file?") from exc
    return Conn(raw, SQLITE)


def _wal(raw: sqlite3.Connection, timeout_s: float) -> None:
    """Put the file in WAL mode (it stays so). On a new file, several processes or threads doing this at once get
    "database is locked" at once: SQLite does not call the busy handler for the lock the mode change takes. So
    retry, backing off, for up to ``timeout_s``; a file already in WAL mode answers at once."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            raw.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _connect_pg(url: str, timeout_s: float) -> Conn:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        raise UserError("--db names a PostgreSQL database but psycopg is not installed",
                        hint="pip install 'psycopg[binary]'") from exc
    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(min(timeout_s, 10))))
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot connect to PostgreSQL at {describe(url)}: {str(exc).strip()}",
                               hint="is the server running and the URL right (postgresql://user@host:port/db)?") \
            from exc
    return Conn(raw, POSTGRES)
