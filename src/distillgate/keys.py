"""API keys per user, stored hashed in the same database as the ledger (table ``gateway_api_keys``).

A key looks like ``dgk_<key_id>_<secret>``; only ``sha256(key)`` is stored, so a leaked database does not leak keys.
Keys are 256-bit random, so a fast hash is enough (no password stretching needed). ``key_id`` is public: it names
the key in ``distillgate keys list/revoke`` and in the decision log.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
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

    ``check`` reads the key's row on every call (a revocation, made by any process, counts from the next check);
    only the ``KeyCheck`` made of a row is kept, keyed by the row itself, so a revoked key's row (its
    ``revoked_at`` set) makes a new one."""

    def __init__(self, db_path: str | Path) -> None:
        super().__init__(db_path)
        self._checks: dict[tuple[str, str, str | None], KeyCheck] = {}

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
        with self._lock:
            conn = self._live()
            row = conn.execute(
                'SELECT "user", key_id, revoked_at FROM gateway_api_keys WHERE key_hash = ?',
                (hash_key(presented),)).fetchone()
        if row is None:
            return _INVALID
        check = self._checks.get(row)
        if check is None:
            user, key_id, revoked_at = row
            check = KeyCheck("revoked" if revoked_at else "ok", user=user, key_id=key_id)
            if len(self._checks) < 4096:  # one per key (and per revoked key): bounded by the table, and capped
                self._checks[row] = check
        return check
