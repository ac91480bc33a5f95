"""The narrow seam between the store's rules and its database: connect, take the write lock, finish a write.

Everything else (the hash chain, quotas, charging, checkpoints, reads) is written once above this, in SQL both
engines accept (distillgate/db.py). What differs is how writers of several processes take turns and how a writer
knows its cache is still valid:

* ``SqliteBackend``: writers of the processes sharing the file queue on an ``flock`` (the kernel hands it over at
  once; SQLite's busy handler would sleep 1, 2, 5, 10 ... ms between tries), then ``BEGIN IMMEDIATE``; the cache is
  valid while ``PRAGMA data_version`` is unchanged (it changes when another connection commits).
* ``PostgresBackend``: ``BEGIN`` then ``SELECT generation FROM write_head ... FOR UPDATE``: every writer of every
  replica holds that row lock while it reads the chain head and quota counters and writes, so appends are one
  sequence (one hash chain, one Merkle frontier) and a reservation is checked and taken under the same lock (never
  read-then-write without it). Before COMMIT the writer bumps ``generation``; a replica that finds another value
  than its cache was built under reloads the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Protocol

from distillgate.db import Conn, connect, describe, is_postgres


class Backend(Protocol):
    @property
    def label(self) -> str:
        """The database as the user named it (a path or a URL), any password masked."""

    @property
    def sidecar(self) -> Path | None:
        """Where the signing key and witness file default to beside the database (None: no such place)."""

    def connect(self) -> Conn: ...

    def write_lock(self) -> contextlib.AbstractContextManager[None]: ...

    def begin_write(self, conn: Conn) -> int:
        """Open the write transaction; the version the committed state has now."""

    def end_write(self, conn: Conn, version: int) -> int:
        """Just before COMMIT: the version the state will have once this transaction commits."""

    def close(self) -> None: ...


class SqliteBackend:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.label = str(path)
        memory = str(path) == ":memory:"
        self.sidecar = None if memory else self.path
        self._lock_fd: int | None = None
        self._connect_first: Conn | None = connect(path)  # fails with a clear error before a lock file is made
        if not memory:
            self._lock_fd = os.open(str(self.path) + ".write-lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = _Flock(self)

    def connect(self) -> Conn:
        conn, self._connect_first = self._connect_first, None
        return conn if conn is not None else connect(self.path)

    def write_lock(self) -> contextlib.AbstractContextManager[None]:
        return self._lock if self._lock_fd is not None else contextlib.nullcontext()

    def begin_write(self, conn: Conn) -> int:
        conn.execute("BEGIN IMMEDIATE")
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def end_write(self, conn: Conn, version: int) -> int:
        return version  # this connection's own commit leaves its data_version as it is

    def close(self) -> None:
        if self._connect_first is not None:
            self._connect_first.close()
            self._connect_first = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _Flock:
    """The ``flock`` on a SQLite store's lock file as a context manager (a class: a generator-based one costs a
    generator and three calls per commit)."""

    __slots__ = ("_backend",)

    def __init__(self, backend: SqliteBackend) -> None:
        self._backend = backend

    def __enter__(self) -> None:
        fd = self._backend._lock_fd
        assert fd is not None
        fcntl.flock(fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fd = self._backend._lock_fd
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)


class PostgresBackend:
    def __init__(self, url: str) -> None:
        self.url = url
        self.label = describe(url)
        self.sidecar = None

    def connect(self) -> Conn:
        return connect(self.url)

    def write_lock(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def begin_write(self, conn: Conn) -> int:
        conn.execute("BEGIN")
        return int(conn.execute("SELECT generation FROM write_head WHERE id = 1 FOR UPDATE").fetchone()[0])

    def end_write(self, conn: Conn, version: int) -> int:
        return int(conn.execute("UPDATE write_head SET generation = generation + 1 WHERE id = 1 "
                                "RETURNING generation").fetchone()[0])

    def close(self) -> None:
        pass


def open_backend(db: str | Path) -> SqliteBackend | PostgresBackend:
    return PostgresBackend(str(db)) if is_postgres(db) else SqliteBackend(db)
