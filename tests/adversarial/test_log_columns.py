"""Editing a derived column of the log (`run`, `kind`, `project`, `user`, `ts`) in the database file.

Reads and exports select on those fields; the columns are copies of the hashed body, so an edit must fail
verification, and a run's export must still hold exactly the run's entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _log_support import sql

from distillgate.ledger import Store
from distillgate.ledger.export import export_run
from distillgate.ledger.verify import verify_db
from distillgate.policy import load_policies, policy_from_data

from _foundation_support import SEED, request


def make_log(tmp: Path) -> tuple[Path, Path, list[int]]:
    dest = (tmp / "exports").as_uri() + "/"
    policy_path = tmp / "policy.json"
    policy_path.write_text(json.dumps({**SEED, "allowed_destinations": [dest]}))
    policy = policy_from_data(json.loads(policy_path.read_text()))
    db = tmp / "s.db"
    r1: list[int] = []
    with Store.open(db, checkpoint_every=4) as store:
        for i in range(6):
            a = store.admit(policy, request(run="r1" if i % 2 else "r2"))
            if i % 2:
                r1.append(a.entry.index)
    return db, policy_path, r1


def exported_indices(tmp: Path, db: Path, policy_path: Path, name: str) -> list[int]:
    dest = (tmp / "exports" / name).as_uri() + "/"
    with Store.open(db) as store:
        export_run(store, load_policies(policy_path), "r1", dest)
    lines = [json.loads(x) for x in (tmp / "exports" / name / "decisions.jsonl").read_text().splitlines()]
    return [x["index"] for x in lines if x["kind"] == "decision" and x["request_kind"] == "inference"]


@pytest.mark.parametrize("column, value", [("run", "r2"), ("kind", "review"), ("project", "moonshot"),
                                           ("user", "mallory"), ("ts", "2020-01-01T00:00:00Z")])
def test_an_edited_column_fails_verify_and_does_not_change_the_export(tmp_path: Path, column: str,
                                                                      value: str) -> None:
    db, policy_path, r1 = make_log(tmp_path)
    assert exported_indices(tmp_path, db, policy_path, "before") == r1
    sql(db, (f"UPDATE log SET {column}=? WHERE idx=?", (value, r1[0])))
    report = verify_db(db)
    assert not report.ok and report.first_bad_index == r1[0]
    assert any(f"column {column!r}" in p and "edited" in p for p in report.problems)
    assert exported_indices(tmp_path, db, policy_path, "after") == r1  # the edited row is still in its run's export
