"""Reviewer accounts with passwords, in the same database as the API keys and the decision log (``--db``).

Made with ``distillgate review user add``; the review site accepts them next to API keys. Only a scrypt hash of a
password is stored (``hashlib.scrypt``, a fresh 16-byte random salt per password), with its cost parameters:

    scrypt$n=32768,r=8,p=1$<salt, base64>$<derived key, base64>

so hashes made with other parameters still verify. Keys are compared in constant time (``hmac.compare_digest``),
and an unknown user name costs the same scrypt run as a known one.

Failed sign-ins are counted per user name, known or not (table ``review_signin_failures``): ``MAX_FAILURES`` in a
row, each within ``FAILURE_WINDOW_S`` of the one before, lock the name for ``LOCKOUT_S`` seconds, during which even
the right password is refused; a successful sign-in clears the count. Counts older than the window are dropped, so
the table holds only names tried lately. A disabled account cannot sign in and its sessions end at their next request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass
from functools import cache
from typing import Literal

from distillgate.errors import NotFoundError, UserError
from distillgate.keys import SideTable, now_iso

MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # scrypt reads the whole password: bound the work one request can ask for
MAX_USER_CHARS = 100
MAX_FAILURES = 5
LOCKOUT_S = 60.0
FAILURE_WINDOW_S = 15 * 60.0  # a failure this long after the previous one starts a new count



@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost: CPU/memory cost ``n`` (a power of two), block size ``r``, parallelism ``p``."""

    n: int = 2**15
    r: int = 8
    p: int = 1

    @property
    def maxmem(self) -> int:
        return 2 * 128 * self.n * self.r * self.p  # scrypt needs 128*n*r*p bytes; leave room


DEFAULT_PARAMS = ScryptParams()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, params: ScryptParams = DEFAULT_PARAMS) -> str:
    """The stored form of ``password``: ``scrypt$n=..,r=..,p=..$salt$key`` with a fresh random salt."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=params.n, r=params.r, p=params.p,
                         maxmem=params.maxmem, dklen=32)
    return f"scrypt$n={params.n},r={params.r},p={params.p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the stored ``encoded`` hash (constant-time comparison of the keys)."""
    try:
        scheme, costs, salt_text, key_text = encoded.split("$")
        fields = dict(item.split("=", 1) for item in costs.split(","))
        params = ScryptParams(n=int(fields["n"]), r=int(fields["r"]), p=int(fields["p"]))
        salt, expected = base64.b64decode(salt_text, validate=True), base64.b64decode(key_text, validate=True)
    except (ValueError, KeyError) as exc:
        raise UserError("a stored password hash is malformed",
                        hint="set the account up again (`distillgate review user add`)") from exc
    if scheme != "scrypt":
        raise UserError(f"stored password hash uses unknown scheme {scheme!r}", hint="set the account up again")
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=params.n, r=params.r, p=params.p,
                         maxmem=params.maxmem, dklen=len(expected))
    return hmac.compare_digest(key, expected)


@cache
def _dummy_hash() -> str:
    """A hash no password matches, so an unknown user name costs the same scrypt run as a known one."""
    return hash_password(secrets.token_urlsafe(24))


def check_new_password(user: str, password: str) -> None:
    """Raise ``UserError`` when ``password`` is too short, too long or the user name itself."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise UserError(f"the password is {len(password)} characters long; reviewer passwords need at least "
                        f"{MIN_PASSWORD_CHARS}", hint="choose a longer password, e.g. a few unrelated words")
    if len(password) > MAX_PASSWORD_CHARS:
        raise UserError(f"the password is longer than {MAX_PASSWORD_CHARS} characters",
                        hint="choose a shorter password")
    if password.strip().lower() == user.strip().lower():
        raise UserError("the password may not be the user name", hint="choose another password")


def no_account(user: str) -> NotFoundError:
    return NotFoundError(f"no reviewer account {user!r}", hint="see `distillgate review user list --db PATH`")


def check_user_name(user: str) -> None:
    if not user or not user.strip() or user != user.strip():
        raise UserError(f"user {user!r} is empty or has surrounding spaces", hint="pass --user alice")
    if len(user) > MAX_USER_CHARS or not user.isprintable():
        raise UserError(f"user name {user[:MAX_USER_CHARS]!r}… is longer than {MAX_USER_CHARS} characters or holds "
                        "control characters", hint="pass a short printable name, e.g. --user alice")


@dataclass(frozen=True)
class Account:
    """A stored reviewer account (never the password or its hash)."""

    user: str
    created_at: str
    disabled_at: str | None = None

    @property
    def active(self) -> bool:
        return self.disabled_at is None


PasswordStatus = Literal["ok", "unknown", "wrong", "disabled", "locked"]


@dataclass(frozen=True)
class PasswordCheck:
    """The result of a password sign-in attempt.

    ``failures``: failures in a row for the name after this attempt; ``locked_for_s``: how long the name is locked
    from now (positive when this attempt hit the limit or came during a lockout).
    """

    status: PasswordStatus
    user: str
    failures: int = 0
    locked_for_s: float = 0.0


class AccountStore(SideTable):
    """Add, list, disable and check reviewer accounts. Thread-safe (one connection behind a lock)."""

    def add(self, user: str, password: str, *, params: ScryptParams = DEFAULT_PARAMS) -> Account:
        """Create the account ``user``; ``UserError`` when it exists or the password breaks the rules."""
        check_user_name(user)
        check_new_password(user, password)
        encoded = hash_password(password, params)
        record = Account(user=user, created_at=now_iso())
        with self._lock:
            try:
                self._live().execute('INSERT INTO review_accounts ("user", password_hash, created_at) VALUES (?, ?, ?)',
                                   (user, encoded, record.created_at))
            except Exception as exc:
                if not _is_unique_violation(exc):
                    raise
                raise UserError(f"reviewer account {user!r} already exists",
                                hint="see `distillgate review user list`; pick another name") from None
        return record

    def set_password(self, user: str, password: str, *, params: ScryptParams = DEFAULT_PARAMS) -> Account:
        """Give ``user`` a new password. Its open sessions end at their next request (``session_marker`` changes)
        and a sign-in lockout is lifted."""
        check_new_password(user, password)
        encoded = hash_password(password, params)
        with self._lock:
            cur = self._live().execute('UPDATE review_accounts SET password_hash = ? WHERE "user" = ?', (encoded, user))
            self._live().execute('DELETE FROM review_signin_failures WHERE "user" = ?', (user,))
        if cur.rowcount == 0:
            raise no_account(user)
        account = self.get(user)
        assert account is not None
        return account

    def enable(self, user: str) -> Account:
        """Re-enable a disabled account (with its old password; set a new one with ``set_password``)."""
        changed, account = self._set_disabled(user, None)
        if not changed:
            raise UserError(f"reviewer account {user!r} is not disabled")
        return account

    def _set_disabled(self, user: str, disabled_at: str | None) -> tuple[bool, Account]:
        """Disable (``disabled_at``) or enable (None) ``user``; whether that changed it, and the account after."""
        was = "disabled_at IS NULL" if disabled_at is not None else "disabled_at IS NOT NULL"
        with self._lock:
            cur = self._live().execute(f'UPDATE review_accounts SET disabled_at = ? WHERE "user" = ? AND {was}',
                                     (disabled_at, user))
        account = self.get(user)
        if account is None:
            raise no_account(user)
        return cur.rowcount > 0, account

    def session_marker(self, user: str) -> str | None:
        """What a password session remembers of the account: a digest of the current password hash (it changes with
        every new password, salt included). None for an unknown or disabled account."""
        with self._lock:
            row = self._live().execute('SELECT password_hash, disabled_at FROM review_accounts WHERE "user" = ?',
                                     (user,)).fetchone()
        if row is None or row[1] is not None:
            return None
        return hashlib.sha256(row[0].encode()).hexdigest()[:32]

    def list(self) -> list[Account]:
        with self._lock:
            rows = self._live().execute(
                'SELECT "user", created_at, disabled_at FROM review_accounts ORDER BY created_at, "user"').fetchall()
        return [Account(*row) for row in rows]

    def get(self, user: str) -> Account | None:
        with self._lock:
            row = self._live().execute('SELECT "user", created_at, disabled_at FROM review_accounts WHERE "user" = ?',
                                     (user,)).fetchone()
        return Account(*row) if row else None

    def disable(self, user: str) -> Account:
        """Disable ``user``: no more sign-ins, and the account's open sessions end at their next request."""
        changed, account = self._set_disabled(user, now_iso())
        if not changed:
            raise UserError(f"reviewer account {user!r} was already disabled at {account.disabled_at}")
        return account

    def active(self, user: str) -> bool:
        account = self.get(user)
        return account is not None and account.active

    def check(self, user: str, password: str, *, now: float) -> PasswordCheck:
        """Check a sign-in attempt at time ``now`` (seconds), counting failures and enforcing the lockout."""
        with self._lock:
            found = self._live().execute('SELECT locked_until FROM review_signin_failures WHERE "user" = ?',
                                       (user,)).fetchone()
            account = self._live().execute('SELECT password_hash, disabled_at FROM review_accounts WHERE "user" = ?',
                                         (user,)).fetchone()
        if found is not None and found[0] is not None and float(found[0]) > now:
            return PasswordCheck("locked", user, MAX_FAILURES, float(found[0]) - now)
        too_long = len(password) > MAX_PASSWORD_CHARS
        matches = verify_password("" if too_long else password, account[0] if account else _dummy_hash())
        if account is not None and matches and not too_long:
            with self._lock:
                self._live().execute('DELETE FROM review_signin_failures WHERE "user" = ?', (user,))
            return PasswordCheck("disabled" if account[1] else "ok", user)
        with self._lock:
            self._live().execute('DELETE FROM review_signin_failures WHERE last_at < ? AND "user" != ? '
                               "AND (locked_until IS NULL OR locked_until < ?)", (now - FAILURE_WINDOW_S, user, now))
            failures = int(self._live().execute(
                'INSERT INTO review_signin_failures ("user", failures, last_at, locked_until) VALUES (?, 1, ?, NULL) '
                'ON CONFLICT ("user") DO UPDATE SET failures = CASE WHEN review_signin_failures.last_at < ? THEN 1 '
                "ELSE review_signin_failures.failures + 1 END, last_at = excluded.last_at RETURNING failures", (user, now, now - FAILURE_WINDOW_S)).fetchone()[0])
            locked_for = 0.0
            if failures >= MAX_FAILURES:
                locked_for = LOCKOUT_S
                self._live().execute('UPDATE review_signin_failures SET failures = 0, locked_until = ? WHERE "user" = ?',
                                   (now + LOCKOUT_S, user))
        return PasswordCheck("wrong" if account is not None else "unknown", user, failures, locked_for)


def _is_unique_violation(exc: BaseException) -> bool:
    """A primary-key clash, from either database (sqlite3.IntegrityError, psycopg's UniqueViolation)."""
    if isinstance(exc, sqlite3.IntegrityError):
        return True
    return type(exc).__name__ == "UniqueViolation"
