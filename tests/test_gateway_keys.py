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
