from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from distillgate.canonical import canonical_json, sha256_hex
from distillgate.db import Conn, connect
from distillgate.errors import IntegrityError
from distillgate.ledger import Store
from distillgate.ledger.signing import Signer, verify_json
from distillgate.ledger.verify import verify_db
from distillgate.policy import policy_from_data

from _foundation_support import SEED, request

POLICY = policy_from_data(SEED)


@contextlib.contextmanager
def tamper(db: str | Path) -> Iterator[Conn]:
    """A raw connection to the store (either backend) in one transaction: what an attacker with database access
    does."""
    conn = connect(db)
    conn.execute("BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.rollback_quietly()
        conn.close()


@pytest.fixture
def log_db(store_db: str) -> str:
    return store_db


def make_log(db: str, n: int = 30, every: int = 8) -> tuple[str, str]:
    with Store.open(db, checkpoint_every=every) as store:
        for i in range(n):
            a = store.admit(POLICY, request(run=f"run-{i % 3}"))
            if i % 2 == 0 and a.reservation_id:
                store.settle(a.reservation_id, prompt_tokens=3, completion_tokens=4)
        pem = store.signer.public_key_pem()
    return db, pem


def sql(db: str | Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    with tamper(db) as conn:
        for stmt, args in statements:
            conn.execute(stmt, args)


def row(db: str | Path, idx: int) -> tuple[str, bytes]:
    with tamper(db) as conn:
        r = conn.execute("SELECT entry_hash, body FROM log WHERE idx=?", (idx,)).fetchone()
    return r[0], bytes(r[1])


def test_intact_log_verifies_with_the_trusted_key(log_db: str) -> None:
    db, pem = make_log(log_db)
    report = verify_db(db, pem)
    assert report.ok, report.problems
    assert report.entries == 45 and report.checkpoints_checked == 5 + 1  # 5 periodic (8..40) + signed head


def test_entries_are_chained_canonical_json(log_db: str) -> None:
    db, _ = make_log(log_db, n=3)
    h0, b0 = row(db, 0)
    _, b1 = row(db, 1)
    assert sha256_hex(b0) == h0 and canonical_json(orjson.loads(b0)) == b0
    assert orjson.loads(b1)["prev_hash"] == h0 and orjson.loads(b0)["prev_hash"] == "0" * 64


def test_modified_entry_is_named(log_db: str) -> None:
    db, pem = make_log(log_db)
    _, body = row(db, 12)
    sql(db, ("UPDATE log SET body=? WHERE idx=12", (body.replace(b'"alice"', b'"mallory"'),)))
    report = verify_db(db, pem)
    assert not report.ok and report.first_bad_index == 12
    assert any("modified" in p for p in report.problems)


def test_rechained_forgery_is_caught_by_signed_checkpoints(log_db: str) -> None:
    """An attacker without the key who rewrites entry 12 and recomputes every later hash still fails."""
    db, pem = make_log(log_db)
    with tamper(db) as conn:
        rows = conn.execute("SELECT idx, body FROM log WHERE idx >= 12 ORDER BY idx").fetchall()
        prev = conn.execute("SELECT entry_hash FROM log WHERE idx=11").fetchone()[0]
        for idx, body in rows:
            parsed = orjson.loads(bytes(body))
            if idx == 12:
                parsed["user"] = "mallory"
            parsed["prev_hash"] = prev
            data = canonical_json(parsed)
            prev = sha256_hex(data)
            conn.execute("UPDATE log SET body=?, entry_hash=? WHERE idx=?", (data, prev, idx))
    report = verify_db(db, pem)
    assert not report.ok
    assert report.first_bad_index is not None and 12 <= report.first_bad_index <= 15  # first checkpoint after it
    assert any("Merkle root mismatch" in p for p in report.problems)


def test_deleted_entry_is_named(log_db: str) -> None:
    db, pem = make_log(log_db)
    sql(db, ("DELETE FROM log WHERE idx=7", ()))
    report = verify_db(db, pem)
    assert not report.ok and report.first_bad_index == 7


def test_reordered_entries_are_named(log_db: str) -> None:
    db, pem = make_log(log_db)
    h3, b3 = row(db, 3)
    h4, b4 = row(db, 4)
    sql(db, ("UPDATE log SET body=?, entry_hash=? WHERE idx=3", (b4, h4)),
        ("UPDATE log SET body=?, entry_hash=? WHERE idx=4", (b3, h3)))
    report = verify_db(db, pem)
    assert not report.ok and report.first_bad_index == 3


def test_inserted_entry_is_named(log_db: str) -> None:
    db, pem = make_log(log_db)
    before_8 = row(db, 8)
    with tamper(db) as conn:
        rows = conn.execute("SELECT idx FROM log WHERE idx >= 9 ORDER BY idx DESC")
        for (idx,) in rows.fetchall():
            conn.execute("UPDATE log SET idx=? WHERE idx=?", (idx + 1, idx))
        forged = dict(orjson.loads(before_8[1]))
        forged.update(index=9, user="mallory", prev_hash=before_8[0])
        data = canonical_json(forged)
        # a careful forger copies the derived columns from the forged body (else verify names entry 9 itself)
        conn.execute('INSERT INTO log (idx, entry_hash, body, kind, ts, run, project, "user") '
                     "VALUES (9, ?, ?, ?, ?, ?, ?, ?)", (sha256_hex(data), data, forged["kind"], forged["ts"],
                                                        forged.get("run"), forged.get("project"), forged["user"]))
    report = verify_db(db, pem)
    # the forged entry 9 is self-consistent, so the break shows at the link 9 -> 10 (the moved original)
    assert not report.ok and report.first_bad_index == 10
    assert any("entry 10: prev_hash does not link to entry 9" in p for p in report.problems)
    assert any("entry 10: records index 9" in p for p in report.problems)


def test_appended_entry_outside_distillgate_is_named(log_db: str) -> None:
    db, pem = make_log(log_db)
    h_last, _ = row(db, 44)
    body = canonical_json({"index": 45, "prev_hash": h_last, "kind": "decision", "user": "mallory"})
    sql(db, ("INSERT INTO log (idx, entry_hash, body, kind, ts) VALUES (45, ?, ?, 'decision', 'x')",
             (sha256_hex(body), body)))
    report = verify_db(db, pem)
    assert not report.ok and report.first_bad_index == 45


def test_truncated_log_is_named(log_db: str) -> None:
    db, pem = make_log(log_db)
    sql(db, ("DELETE FROM log WHERE idx >= 30", ()))
    report = verify_db(db, pem)
    assert not report.ok and report.first_bad_index == 30
    assert any("truncated" in p for p in report.problems)


def test_forged_checkpoints_are_rejected(log_db: str) -> None:
    db, pem = make_log(log_db)
    sql(db, ("UPDATE checkpoints SET root_hash=? WHERE tree_size=16", ("ab" * 32,)))
    report = verify_db(db, pem)
    assert not report.ok and any("signature invalid" in p for p in report.problems)
    assert report.first_bad_index == 15


def test_resigned_log_fails_against_the_trusted_key(log_db: str) -> None:
    db, pem = make_log(log_db)
    mallory = Signer.generate()
    with tamper(db) as conn:
        for size, root, ts, _kid, _sig in conn.execute("SELECT * FROM checkpoints").fetchall():
            payload = {"tree_size": size, "root_hash": root, "ts": ts, "key_id": mallory.key_id}
            conn.execute("UPDATE checkpoints SET key_id=?, signature=? WHERE tree_size=?",
                         (mallory.key_id, mallory.sign_json(payload), size))
        conn.execute("UPDATE meta SET value=? WHERE key='public_key'", (mallory.public_key_pem().encode(),))
    assert not verify_db(db, pem).ok
    assert not verify_json(pem, {"a": 1}, mallory.sign_json({"a": 1}))


WRITER = r"""
import sys
from distillgate.errors import IntegrityError
from distillgate.ledger import Store
from distillgate.policy import Request, policy_from_data
import json
policy = policy_from_data(json.loads(sys.argv[2]))
store = Store.open(sys.argv[1], checkpoint_every=50)
i = 0
while True:
    a = store.admit(policy, Request(user="alice", project="internal-compression", run="crash", output_type="labels",
                                    model="m", max_tokens=1))
    print(a.entry.index, a.entry.entry_hash, flush=True)
    i += 1
"""


def test_acknowledged_decisions_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    Store.open(db).close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), orjson.dumps(SEED).decode()],
                            stdout=subprocess.PIPE, text=True)
    acked: list[tuple[int, str]] = []
    assert proc.stdout is not None
    deadline = time.time() + 60
    while len(acked) < 150 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        idx, h = line.split()
        acked.append((int(idx), h))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 150
    report = verify_db(db)
    assert report.ok, report.problems
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT idx, entry_hash FROM log").fetchall())
    conn.close()
    for idx, h in acked:
        assert stored.get(idx) == h, f"acknowledged entry {idx} lost after SIGKILL"
    with Store.open(db) as store:  # the store reopens and keeps appending to the same chain
        a = store.admit(POLICY, request())
        assert a.entry.index == len(stored)
    assert verify_db(db).ok


@pytest.mark.parametrize("every", [1, 3])
def test_checkpoint_on_demand(tmp_path: Path, every: int) -> None:
    with Store.open(tmp_path / "c.db", checkpoint_every=every) as store:
        store.admit(POLICY, request())
        store.admit(POLICY, request())
        cp = store.checkpoint()
        assert cp.tree_size == 2 and verify_json(store.signer.public_key_pem(), cp.payload(), cp.signature)


def test_a_replica_with_another_key_cannot_append_to_a_log_started_meanwhile(store_db: str) -> None:
    """Two processes open an empty store with different keys; the first to write starts the log with its key, and
    the other is refused at its first write (never a log whose heads are signed by two keys)."""
    first, second = Signer.generate(), Signer.generate()
    a = Store.open(store_db, signer=first)
    b = Store.open(store_db, signer=second)  # the log is empty: nothing to compare yet
    try:
        a.admit(POLICY, request())
        with pytest.raises(IntegrityError, match="same signing key"):
            b.admit(POLICY, request())
    finally:
        a.close()
        b.close()
    assert verify_db(store_db, first.public_key_pem()).ok
