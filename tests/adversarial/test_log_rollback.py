"""Rolling the decision log back to an old signed checkpoint, by someone who can write the database file.

Every signature in a rolled-back log is genuine, so the log alone verifies; the witness (every signed head, appended
outside the store) and an export's checkpoint.json do not, and `audit verify --witness` names the rollback.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from _log_support import rows, served, sql

from distillgate.ledger.merkle import Frontier

from conftest import run_cli


def roll_back(db: Path) -> int:
    """Delete every entry after the second-to-last checkpoint, and make that checkpoint the signed head again,
    with a Merkle frontier to match (everything an attacker needs is in the file). Returns the new size."""
    sizes = [s for (s,) in rows(db, "SELECT tree_size FROM checkpoints ORDER BY tree_size")]
    size = sizes[-2]
    (cp,) = rows(db, "SELECT tree_size, root_hash, ts, key_id, signature FROM checkpoints WHERE tree_size=?", (size,))
    head = dict(zip(("tree_size", "root_hash", "ts", "key_id", "signature"), cp, strict=True))
    frontier = Frontier()
    for (entry_hash,) in rows(db, "SELECT entry_hash FROM log WHERE idx < ? ORDER BY idx", (size,)):
        frontier.append(entry_hash)
    sql(db, ("DELETE FROM log WHERE idx >= ?", (size,)), ("DELETE FROM checkpoints WHERE tree_size > ?", (size,)),
        ("UPDATE meta SET value=? WHERE key='head'", (orjson.dumps(head),)),
        ("UPDATE meta SET value=? WHERE key='frontier'", (orjson.dumps(frontier.to_json()),)))
    return int(size)


def test_rollback_to_an_old_checkpoint_fails_verify_with_the_witness(tmp_path: Path) -> None:
    with served(tmp_path) as s:
        for i in range(8):
            assert s.chat(run="r1", content=f"q{i}").status_code == 200
    db = s.db
    (before,) = rows(db, "SELECT count(*) FROM log")[0]
    size = roll_back(db)
    assert size < before
    alone = run_cli("audit", "verify", "--db", str(db))
    assert alone.returncode == 0 and "no witness given" in alone.stdout  # what docs/audit.md says is not detected
    witnessed = run_cli("audit", "verify", "--db", str(db), "--witness", str(db) + ".witness.jsonl", "--json")
    assert witnessed.returncode == 2, witnessed.stdout
    report = json.loads(witnessed.stdout)
    assert report["first_bad_index"] == size and report["witnessed_size"] == before
    assert any(p.startswith("rolled back") for p in report["problems"])


@pytest.mark.slow
def test_rollback_hidden_by_new_traffic_is_a_fork_of_an_exported_checkpoint(tmp_path: Path) -> None:
    dest = (tmp_path / "exports").as_uri() + "/"
    strict = {**_strict_with_destination(dest)}
    with served(tmp_path, policies=(strict,)) as s:
        for i in range(8):
            assert s.chat(run="r1", content=f"q{i}").status_code == 200
    exported = run_cli("audit", "export", "--db", str(s.db), "--run", "r1", "--to", dest + "r1/",
                       "--policy", str(s.policy_dir))
    assert exported.returncode == 0, exported.stderr
    checkpoint = tmp_path / "exports" / "r1" / "checkpoint.json"
    roll_back(s.db)
    # the gateway goes on serving on top of the rolled-back log: it grows past the exported size again
    with served(tmp_path / "again", policies=(strict,), db_path=s.db) as s2:
        for i in range(30):
            assert s2.chat(run="r2", content=f"again {i}").status_code == 200
    alone = run_cli("audit", "verify", "--db", str(s.db))
    assert alone.returncode == 0, alone.stderr  # signatures all genuine, the head covers every entry
    res = run_cli("audit", "verify", "--db", str(s.db), "--witness", str(checkpoint), "--json")
    assert res.returncode == 2
    report = json.loads(res.stdout)
    assert any(p.startswith("forked") for p in report["problems"]), report["problems"]


def _strict_with_destination(dest: str) -> dict[str, object]:
    from _log_support import STRICT

    return {**STRICT, "allowed_destinations": [dest]}
