"""API keys: stored hashed, shown once, revocable; the keys CLI as a real subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillgate.errors import NotFoundError, UserError
from distillgate.keys import KeyStore

from conftest import run_cli


def test_create_check_revoke(tmp_path: Path) -> None:
    ks = KeyStore(tmp_path / "k.db")
    record, secret = ks.create("alice", label="laptop")
    assert secret.startswith(f"dgk_{record.key_id}_") and len(secret) > 40
    assert ks.check(secret).status == "ok" and ks.check(secret).user == "alice"
    assert ks.check(None).status == "missing"
    assert ks.check(secret + "x").status == "invalid"
    ks.revoke(record.key_id)
    assert ks.check(secret).status == "revoked"
    with pytest.raises(UserError, match="already revoked"):
        ks.revoke(record.key_id)
    with pytest.raises(NotFoundError):
        ks.revoke("nope")
    with pytest.raises(UserError):
        ks.create(" spaced ")
    ks.close()
    assert secret.encode() not in (tmp_path / "k.db").read_bytes()  # only the hash is stored


def test_keys_cli(tmp_path: Path) -> None:
    db = str(tmp_path / "store.db")
    made = run_cli("keys", "create", "--user", "bob", "--db", db)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("dgk_") and "\n" not in secret
    listed = run_cli("keys", "list", "--db", db, "--json")
    assert '"user":"bob"' in listed.stdout and secret not in listed.stdout
    key_id = secret.split("_")[1]
    assert run_cli("keys", "revoke", key_id, "--db", db).returncode == 0
    assert "revoked" in run_cli("keys", "list", "--db", db).stdout
    again = run_cli("keys", "revoke", key_id, "--db", db)
    assert again.returncode == 1 and "already revoked" in again.stderr
    missing = run_cli("keys", "revoke", "0000", "--db", db)
    assert missing.returncode == 1 and "keys list" in missing.stderr


def test_revocation_counts_on_the_next_check_in_every_process(tmp_path: Path) -> None:
    """Checks are memoised per key generation: a revocation by another store (another worker, the CLI) is refused
    on the very next check, with no SQL read on the checks in between."""
    db = tmp_path / "k.db"
    worker, other = KeyStore(db), KeyStore(db)
    record, secret = worker.create("alice")
    assert worker.check(secret).status == "ok"  # memoised now
    reads = []
    worker._conn.raw.set_trace_callback(reads.append)
    assert worker.check(secret).status == "ok" and worker.check(secret).user == "alice"
    assert reads == []  # the memo answered: no SQL
    other.revoke(record.key_id)  # another process's revocation
    assert worker.check(secret).status == "revoked"
    assert worker.check(secret + "x").status == "invalid"
    _, fresh = other.create("bob")  # a key made elsewhere is found at once (unknown keys are never memoised)
    assert worker.check(fresh).user == "bob"
    worker.close(), other.close()


def test_revocation_by_the_cli_counts_on_the_next_check(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    ks = KeyStore(db)
    record, secret = ks.create("carol")
    assert ks.check(secret).status == "ok" and ks.check(secret).status == "ok"
    assert run_cli("keys", "revoke", record.key_id, "--db", str(db)).returncode == 0
    assert ks.check(secret).status == "revoked"
    ks.close()


def test_a_revocation_written_by_hand_counts_within_recheck_s(tmp_path: Path) -> None:
    """Without the sidecar generation (an UPDATE by hand) the memo lasts RECHECK_S at most; without the sidecar
    file at all, every check reads the row."""
    import os
    import time

    db = tmp_path / "k.db"
    ks = KeyStore(db)
    record, secret = ks.create("dave")
    assert ks.check(secret).status == "ok"
    with ks._lock:
        ks._conn.execute("UPDATE gateway_api_keys SET revoked_at = 'x' WHERE key_id = ?", (record.key_id,))
    time.sleep(KeyStore.RECHECK_S + 0.05)
    assert ks.check(secret).status == "revoked"
    os.unlink(str(db) + "-keygen")
    with ks._lock:
        ks._conn.execute("UPDATE gateway_api_keys SET revoked_at = NULL WHERE key_id = ?", (record.key_id,))
    assert ks.check(secret).status == "ok"
    with ks._lock:
        ks._conn.execute("UPDATE gateway_api_keys SET revoked_at = 'x' WHERE key_id = ?", (record.key_id,))
    assert ks.check(secret).status == "revoked"
    ks.close()
