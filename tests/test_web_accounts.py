"""Reviewer accounts: the scrypt password store (hash format, wrong password, disabled user, lockout) and the
``distillgate review user add/list/disable`` commands, run as real subprocesses."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from distillgate.db import connect, is_postgres
from distillgate.errors import NotFoundError, UserError
from distillgate.web.accounts import (
    FAILURE_WINDOW_S,
    LOCKOUT_S,
    MAX_FAILURES,
    MIN_PASSWORD_CHARS,
    AccountStore,
    ScryptParams,
    hash_password,
    verify_password,
)

PASSWORD = "correct horse battery"
CHEAP = ScryptParams(n=2**10, r=8, p=1)  # a valid, cheaper cost: stored hashes name their own parameters


@pytest.fixture()
def store(store_db: str) -> Iterator[AccountStore]:
    """Accounts on each backend (conftest.py ``store_db``: a SQLite file, a PostgreSQL database)."""
    accounts = AccountStore(store_db)
    yield accounts
    accounts.close()


def test_hash_format_names_its_parameters_and_uses_a_fresh_salt() -> None:
    encoded = hash_password(PASSWORD)
    scheme, costs, salt, key = encoded.split("$")
    assert (scheme, costs) == ("scrypt", "n=32768,r=8,p=1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(key)) == 32
    again = hash_password(PASSWORD)
    assert again.split("$")[2] != salt and again != encoded  # a new random salt each time
    assert verify_password(PASSWORD, encoded) and verify_password(PASSWORD, again)
    assert not verify_password(PASSWORD + "!", encoded) and not verify_password("", encoded)
    # the parameters come from the stored hash, so a hash made with other costs still verifies
    cheap = hash_password(PASSWORD, CHEAP)
    assert cheap.split("$")[1] == "n=1024,r=8,p=1" and verify_password(PASSWORD, cheap)
    assert not verify_password("wrong password!!", cheap)
    with pytest.raises(UserError, match="malformed"):
        verify_password(PASSWORD, "scrypt$n=1024$abc")


def test_add_enforces_the_password_rules_and_never_stores_the_password(store: AccountStore, tmp_path: Path,
                                                                      store_db: str) -> None:
    with pytest.raises(UserError, match=f"5 characters long; reviewer passwords need at least {MIN_PASSWORD_CHARS}"):
        store.add("alice", "short")
    with pytest.raises(UserError, match="may not be the user name"):
        store.add("alice-the-reviewer", "Alice-the-Reviewer")
    with pytest.raises(UserError, match="surrounding spaces"):
        store.add(" alice", PASSWORD)
    account = store.add("alice", PASSWORD)
    assert (account.user, account.active) == ("alice", True)
    with pytest.raises(UserError, match="already exists"):
        store.add("alice", "another long password")
    store.add("bob", "bob's own long password")
    assert [a.user for a in store.list()] == ["alice", "bob"]
    if is_postgres(store_db):  # what a database dump would show
        conn = connect(store_db)
        raw = repr(conn.execute("SELECT * FROM review_accounts").fetchall()).encode()
        conn.close()
    else:
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert PASSWORD.encode() not in raw and b"scrypt$n=32768,r=8,p=1$" in raw


def test_check_accepts_the_right_password_only(store: AccountStore) -> None:
    store.add("alice", PASSWORD)
    assert store.check("alice", PASSWORD, now=0.0).status == "ok"
    wrong = store.check("alice", "correct horse battery staple", now=1.0)
    assert (wrong.status, wrong.failures, wrong.locked_for_s) == ("wrong", 1, 0.0)
    assert store.check("nobody", PASSWORD, now=2.0).status == "unknown"
    assert store.check("alice", "x" * 5000, now=3.0).status == "wrong"  # over-long: refused without hashing it
    assert store.check("alice", PASSWORD, now=4.0).status == "ok"  # and a success clears the count
    assert store.check("alice", "nope nope nope", now=5.0).failures == 1


def test_a_disabled_account_cannot_sign_in(store: AccountStore) -> None:
    store.add("alice", PASSWORD)
    disabled = store.disable("alice")
    assert disabled.disabled_at is not None and not disabled.active and not store.active("alice")
    assert store.check("alice", PASSWORD, now=0.0).status == "disabled"
    assert store.check("alice", "a wrong password", now=1.0).status == "wrong"  # no hint without the password
    with pytest.raises(UserError, match="already disabled"):
        store.disable("alice")
    with pytest.raises(NotFoundError, match="no reviewer account 'carol'"):
        store.disable("carol")


def test_set_password_and_enable(store: AccountStore) -> None:
    store.add("alice", PASSWORD, params=CHEAP)
    marker = store.session_marker("alice")
    for i in range(MAX_FAILURES):
        store.check("alice", f"wrong {i}", now=float(i))
    assert store.check("alice", PASSWORD, now=10.0).status == "locked"
    store.set_password("alice", "another long passphrase", params=CHEAP)
    assert store.session_marker("alice") not in (None, marker)  # open sessions end
    assert store.check("alice", "another long passphrase", now=11.0).status == "ok"  # and the lockout is lifted
    assert store.check("alice", PASSWORD, now=12.0).status == "wrong"
    with pytest.raises(UserError, match="at least 12"):
        store.set_password("alice", "short")
    with pytest.raises(NotFoundError, match="no reviewer account 'carol'"):
        store.set_password("carol", "another long passphrase")
    store.disable("alice")
    assert store.session_marker("alice") is None
    enabled = store.enable("alice")
    assert enabled.active and store.check("alice", "another long passphrase", now=13.0).status == "ok"
    with pytest.raises(UserError, match="is not disabled"):
        store.enable("alice")
    with pytest.raises(NotFoundError):
        store.enable("carol")


def test_five_failures_lock_the_name_for_a_minute(store: AccountStore) -> None:
    store.add("alice", PASSWORD)
    results = [store.check("alice", f"wrong password {i}", now=100.0 + i) for i in range(MAX_FAILURES)]
    assert [r.failures for r in results] == [1, 2, 3, 4, 5]
    assert [r.locked_for_s for r in results] == [0.0, 0.0, 0.0, 0.0, LOCKOUT_S]
    # locked: even the right password is refused, and refused attempts do not extend the lock
    during = store.check("alice", PASSWORD, now=104.0 + 30)
    assert (during.status, during.locked_for_s) == ("locked", pytest.approx(LOCKOUT_S - 30))
    assert store.check("alice", PASSWORD, now=104.0 + LOCKOUT_S - 0.5).status == "locked"
    assert store.check("alice", PASSWORD, now=104.0 + LOCKOUT_S + 0.5).status == "ok"
    # the lock is per name: other users are not affected, unknown names are locked too
    store.add("bob", "bob's own long password")
    for i in range(MAX_FAILURES):
        store.check("mallory", f"guess {i}", now=200.0)
    assert store.check("mallory", "guess 6", now=201.0).status == "locked"
    assert store.check("bob", "bob's own long password", now=201.0).status == "ok"


def test_old_failures_do_not_count_and_are_forgotten(store: AccountStore, store_db: str) -> None:
    store.add("alice", PASSWORD)
    for i in range(MAX_FAILURES - 1):
        store.check("alice", f"wrong password {i}", now=float(i))
    later = store.check("alice", "wrong again", now=3.0 + FAILURE_WINDOW_S + 1)
    assert (later.failures, later.locked_for_s) == (1, 0.0)  # a new count, no lock
    for i in range(3):
        store.check(f"stranger-{i}", "guess", now=0.0)
    store.check("bob", "guess", now=FAILURE_WINDOW_S + 10)  # any failure sweeps out stale counts
    conn = connect(store_db)
    names = sorted(n for (n,) in conn.execute('SELECT "user" FROM review_signin_failures').fetchall())
    conn.close()
    assert names == ["alice", "bob"]


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distillgate", "review", "user", *args], input=stdin,
                          capture_output=True, text=True, env=dict(os.environ), timeout=120)


def test_review_user_commands(tmp_path: Path) -> None:
    db = str(tmp_path / "review.db")
    added = _cli("add", "--db", db, "--user", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert "added reviewer account alice" in added.stdout and PASSWORD not in added.stdout + added.stderr
    short = _cli("add", "--db", db, "--user", "bob", "--password-stdin", stdin="hunter2\n")
    assert short.returncode == 1 and "7 characters long; reviewer passwords need at least 12" in short.stderr
    empty = _cli("add", "--db", db, "--user", "bob", "--password-stdin")
    assert empty.returncode == 1 and "got nothing on standard input" in empty.stderr
    flag = _cli("add", "--db", db, "--user", "bob", "--password", PASSWORD)
    assert flag.returncode != 0 and "No such option '--password'" in flag.stderr  # never a plain flag
    listed = _cli("list", "--db", db, "--json")
    (record,) = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert (record["user"], record["disabled_at"]) == ("alice", None)
    assert _cli("disable", "--db", db, "--user", "alice").returncode == 0
    assert "disabled" in _cli("list", "--db", db).stdout
    again = _cli("disable", "--db", db, "--user", "alice")
    assert again.returncode == 1 and "already disabled" in again.stderr
    store = AccountStore(db)
    try:
        assert store.check("alice", PASSWORD, now=0.0).status == "disabled"  # the stdin password was stored
    finally:
        store.close()
    enabled = _cli("enable", "--db", db, "--user", "alice")
    assert enabled.returncode == 0 and "enabled reviewer account alice" in enabled.stdout
    changed = _cli("passwd", "--db", db, "--user", "alice", "--password-stdin", stdin="a fresh long passphrase\n")
    assert changed.returncode == 0 and "open sessions end" in changed.stdout
    assert "a fresh long passphrase" not in changed.stdout + changed.stderr
    unknown = _cli("passwd", "--db", db, "--user", "carol", "--password-stdin", stdin="a fresh long passphrase\n")
    assert unknown.returncode != 0 and "no reviewer account 'carol'" in unknown.stderr
    store = AccountStore(db)
    try:
        assert store.check("alice", "a fresh long passphrase", now=0.0).status == "ok"
    finally:
        store.close()
    helptext = _cli("add", "--help")
    assert "--password-stdin" in helptext.stdout and "at least 12" in helptext.stdout


def test_add_asks_twice_without_password_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from distillgate.cli.review_cmd import cli

    answers = iter(["first long password", "second long password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    result = CliRunner().invoke(cli, ["user", "add", "--db", str(tmp_path / "r.db"), "--user", "alice"])
    assert isinstance(result.exception, UserError) and "the two passwords differ" in str(result.exception)
    answers = iter([PASSWORD, PASSWORD])
    result = CliRunner().invoke(cli, ["user", "add", "--db", str(tmp_path / "r.db"), "--user", "alice"])
    assert result.exit_code == 0, result.output
    store = AccountStore(tmp_path / "r.db")
    try:
        assert store.check("alice", PASSWORD, now=0.0).status == "ok"
    finally:
        store.close()
