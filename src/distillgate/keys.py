"""API keys per user, stored hashed in the same database as the ledger (table ``gateway_api_keys``).

A key looks like ``dgk_<key_id>_<secret>``; only ``sha256(key)`` is stored, so a leaked database does not leak keys.
Keys are 256-bit random, so a fast hash is enough (no password stretching needed). ``key_id`` is public: it names
the key in ``distillgate keys list/revoke`` and in the decision log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Self

from distillgate.db import Conn, connect, is_postgres
from distillgate.errors import NotFoundError, UserError

AuthStatus = Literal["ok", "missing", "invalid", "revoked"]


@dataclass(frozen=True)
class ApiKey:
    """A stored key (never the secret itself)."""

    key_id: str
    user: str
    created_at: str
    revoked_at: str | None = None
    label: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class KeyCheck:
    """The result of checking a presented key."""

    status: AuthStatus
    user: str | None = None
    key_id: str | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def now_iso() -> str:
    """The current UTC time to the second, as stored in the side tables (keys, reviewer accounts)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class SideTable:
    """A table kept in the ledger's database beside the log (API keys, reviewer accounts): one autocommit
    connection behind a lock, so the store is thread-safe. The tables come from the one migration list
    (ledger/schema.py)."""

    def __init__(self, db_path: str | Path) -> None:
        from distillgate.ledger.schema import migrate

        self.path = Path(db_path)
        if not is_postgres(str(db_path)) and self.path.parent and not self.path.parent.exists():
            raise NotFoundError(f"directory {self.path.parent} does not exist",
                                hint="create it or pass --db with an existing directory")
        self._lock = threading.Lock()
        self._db = str(db_path) if is_postgres(str(db_path)) else self.path
        self._conn = connect(self._db, timeout_s=30)
        migrate(self._conn)

    def _live(self) -> Conn:
        """The connection (call under the lock). One the server dropped (PostgreSQL restarted) is replaced; the
        request that found it dropped got ``StoreUnavailable`` from ``Conn`` (the gateway answers 503)."""
        if self._conn.broken:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = connect(self._db, timeout_s=30)
        return self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_MISSING, _INVALID = KeyCheck("missing"), KeyCheck("invalid")


class KeyStore(SideTable):
    """Create, list, revoke and check API keys. Thread-safe (one connection behind a lock).

    ``check`` keeps the ``KeyCheck`` of each key it found (by the key's hash, never the key), tagged with the
    store's *key generation*: the identity, size and mtime of a sidecar file beside the database
    (``<db>-keygen``), to which every revocation (in any process: the CLI, the web app, another worker) appends one
    byte after its commit. A check reads the generation first (one ``stat``, no SQL) and uses its memo only when
    the generation is the one the memo was read under, so a revocation counts from the very next check, in every
    process. The generation is read before the row, so a row read concurrently with a revocation is tagged with
    the older generation and re-read next time. A row changed outside ``revoke`` (a hand-written SQL ``UPDATE``)
    counts within ``RECHECK_S``: no memo is older than that. Without the sidecar (PostgreSQL, an in-memory
    database, a read-only directory, the file removed) every check reads the row."""

    #: the oldest a memoised check may be (a revocation written without ``revoke`` counts within this time)
    RECHECK_S = 1.0

    def __init__(self, db_path: str | Path) -> None:
        super().__init__(db_path)
        self._checks: dict[tuple[str, str, str | None], KeyCheck] = {}
        #: sha256(key) -> (check, the generation it was read under, monotonic deadline)
        self._known: dict[str, tuple[KeyCheck, tuple[int, int, int], float]] = {}
        self._gen_path: str | None = None
        db = str(db_path)
        if not is_postgres(db) and db != ":memory:" and not db.startswith("file:"):
            gen_path = db + "-keygen"
            try:
                with open(gen_path, "ab"):
                    pass
                self._gen_path = gen_path
            except OSError:  # a read-only directory: no memo, every check reads the row
                self._gen_path = None

    def _generation(self) -> tuple[int, int, int] | None:
        if self._gen_path is None:
            return None
        try:
            st = os.stat(self._gen_path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _bump(self) -> None:
        """A new key generation, for every process's memo (after the change is committed)."""
        self._known.clear()
        if self._gen_path is None:
            return
        try:
            with open(self._gen_path, "ab") as f:
                f.write(b".")
        except OSError:  # cannot write it: remove it, so that nobody trusts a memo any more
            with contextlib.suppress(OSError):
                os.unlink(self._gen_path)

    def create(self, user: str, *, label: str | None = None) -> tuple[ApiKey, str]:
        """Make a new key for ``user``; returns the stored record and the secret (shown once, never stored)."""
        if not user or not user.strip() or user != user.strip():
            raise UserError(f"user {user!r} is empty or has surrounding spaces", hint="pass --user alice")
        key_id = secrets.token_hex(6)
        secret = f"dgk_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id=key_id, user=user, created_at=now_iso(), label=label)
        with self._lock:
            conn = self._live()
            conn.execute(
                'INSERT INTO gateway_api_keys (key_id, key_hash, "user", label, created_at) VALUES (?, ?, ?, ?, ?)',
                (key_id, hash_key(secret), user, label, record.created_at))
        return record, secret

    def list(self, *, user: str | None = None) -> list[ApiKey]:
        sql = 'SELECT key_id, "user", created_at, revoked_at, label FROM gateway_api_keys'
        args: tuple[str, ...] = ()
        if user is not None:
            sql += ' WHERE "user" = ?'
            args = (user,)
        with self._lock:
            conn = self._live()
            rows = conn.execute(sql + " ORDER BY created_at, key_id", args).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id: str) -> ApiKey:
        with self._lock:
            conn = self._live()
            cur = conn.execute(
                "UPDATE gateway_api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (now_iso(), key_id))
            if cur.rowcount:  # committed (autocommit): every process's memo is stale from now on
                self._bump()
            row = conn.execute(
                'SELECT key_id, "user", created_at, revoked_at, label FROM gateway_api_keys WHERE key_id = ?',
                (key_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no API key with id {key_id!r}", hint="see `distillgate keys list --db PATH`")
        if cur.rowcount == 0:
            raise UserError(f"API key {key_id!r} was already revoked at {row[3]}")
        return ApiKey(*row)

    def check(self, presented: str | None) -> KeyCheck:
        """Check a presented key (the bearer token); ``status`` is what the policy's ``auth`` field expects."""
        if not presented:
            return _MISSING
        digest = hash_key(presented)
        gen = self._generation()  # before the row: a row read under an older generation is re-read next time
        known = self._known.get(digest)
        if known is not None and gen is not None and known[1] == gen and known[2] > time.monotonic():
            return known[0]
        with self._lock:
            conn = self._live()
            row = conn.execute(
                'SELECT "user", key_id, revoked_at FROM gateway_api_keys WHERE key_hash = ?',
                (digest,)).fetchone()
        if row is None:
            return _INVALID  # never memoised: a key made a moment ago (by any process) is found next time
        check = self._checks.get(row)
        if check is None:
            user, key_id, revoked_at = row
            check = KeyCheck("revoked" if revoked_at else "ok", user=user, key_id=key_id)
            if len(self._checks) < 4096:  # one per key (and per revoked key): bounded by the table, and capped
                self._checks[row] = check
        if gen is not None:
            known_now = self._known
            if len(known_now) >= 4096:
                known_now.clear()
            known_now[digest] = (check, gen, time.monotonic() + self.RECHECK_S)
        return check
