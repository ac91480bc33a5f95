"""A store copied without its signing-key file, or given another key: never a silent new key.

A new key would sign the next checkpoint, and `audit verify` against the operator's key would then fail for ever;
`audit pubkey` would even print the new key as the operator's. The log's first entry names its key, and a store
with entries refuses to start without that key, saying which file to restore.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distillgate.errors import IntegrityError
from distillgate.ledger import Store
from distillgate.ledger.signing import Signer
from distillgate.ledger.verify import verify_db
from distillgate.policy import policy_from_data

from _foundation_support import SEED, request
from conftest import run_cli


def make_log(tmp: Path) -> tuple[Path, Signer]:
    db = tmp / "orig" / "s.db"
    db.parent.mkdir()
    with Store.open(db) as store:
        for _ in range(3):
            store.admit(policy_from_data(SEED), request())
        signer = store.signer
    return db, signer


def test_a_database_copied_without_its_key_is_refused_and_no_key_is_made(tmp_path: Path) -> None:
    db, signer = make_log(tmp_path)
    copy = tmp_path / "copy" / "s.db"
    copy.parent.mkdir()
    shutil.copy(db, copy)
    key_file = Path(str(copy) + ".signing-key.pem")
    for args in (("audit", "pubkey"), ("audit", "checkpoint")):
        res = run_cli(*args, "--db", str(copy))
        assert res.returncode == 2, res.stdout
        assert "signing key" in res.stderr and "is missing" in res.stderr and f"restore {key_file}" in res.stderr
        assert not key_file.exists()
    with pytest.raises(IntegrityError, match="missing"):
        Store.open(copy)
    assert not key_file.exists()
    # the copy still verifies against the operator's key, which its first entry names
    assert verify_db(copy, signer.public_key_pem()).ok


def test_another_key_file_is_refused(tmp_path: Path) -> None:
    db, signer = make_log(tmp_path)
    key_file = Path(str(db) + ".signing-key.pem")
    key_file.rename(tmp_path / "kept.pem")
    Signer.load_or_create(key_file)  # someone put a fresh key where the operator's was
    res = run_cli("audit", "pubkey", "--db", str(db))
    assert res.returncode == 2 and "is not the key the decision log" in res.stderr and "restore" in res.stderr
    (tmp_path / "kept.pem").replace(key_file)
    ok = run_cli("audit", "pubkey", "--db", str(db))
    assert ok.returncode == 0 and ok.stdout == signer.public_key_pem()


def test_the_first_entry_names_the_key_and_verify_checks_it(tmp_path: Path) -> None:
    db, signer = make_log(tmp_path)
    with Store.open(db) as store:
        first = store.entry(0).body
    assert first["log_key"] == {"key_id": signer.key_id, "public_key_pem": signer.public_key_pem()}
    other = Signer.generate()
    report = verify_db(db, other.public_key_pem())
    assert not report.ok and report.first_bad_index == 0
    assert any("entry 0 names signing key" in p for p in report.problems)
    out = run_cli("audit", "verify", "--db", str(db), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["ok"]
