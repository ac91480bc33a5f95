"""One ordered, recorded migration list (ledger/schema.py), from an empty database and from a store written before
migrations were recorded (tests/data/stores: made with distillgate at 8bd5921)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distillgate.db import connect
from distillgate.keys import KeyStore
from distillgate.ledger import Store
from distillgate.ledger.schema import MIGRATIONS, applied, migrate
from distillgate.ledger.verify import verify_db
from distillgate.ledger.witness import read_witness
from distillgate.policy import policy_from_data

from _foundation_support import SEED, raised_in_threads, request

FIXTURES = Path(__file__).parent / "data" / "stores"
NAMES = [name for name, _ in MIGRATIONS]


def _old_store(tmp_path: Path) -> Path:
    db = tmp_path / "old.db"
    shutil.copy(FIXTURES / "pre-migrations.sqlite3", db)
    shutil.copy(FIXTURES / "pre-migrations.signing-key.fixture-pem", str(db) + ".signing-key.pem")
    shutil.copy(FIXTURES / "pre-migrations.witness.jsonl", str(db) + ".witness.jsonl")
    return db


def test_an_empty_database_gets_every_migration_once_in_order(store_db: str) -> None:
    Store.open(store_db).close()
    conn = connect(store_db)
    try:
        assert applied(conn) == NAMES
        assert migrate(conn) == []  # a second start applies nothing
        assert applied(conn) == NAMES
    finally:
        conn.close()
    KeyStore(store_db).close()  # the key table comes from the same list: nothing more to apply


def test_a_store_from_before_recorded_migrations_opens_verifies_and_goes_on(tmp_path: Path) -> None:
    db = _old_store(tmp_path)
    witnessed = read_witness(str(db) + ".witness.jsonl")
    before = verify_db(db, witnesses=witnessed)
    assert before.ok and before.entries == 7, before.problems
    conn = connect(db)
    try:
        assert migrate(conn) == NAMES  # every migration is safe on the old tables and is recorded
        assert applied(conn) == NAMES
    finally:
        conn.close()
    with Store.open(db) as store:
        assert store.run_owner("old-run") == "internal-compression"
        usage = store.usage("internal-compression", "alice", "old-run", day=store.entry(0).body["ts"][:10])
        assert usage.tokens_today_project == 5 and usage.records_run == 1  # settled 5, refunded, reclaimed
        kinds = [e.body["kind"] for e in store.entries()]
        assert kinds == ["decision", "settlement", "decision", "settlement", "decision", "reclaim", "note"]
        store.admit(policy_from_data(SEED), request(run="new-run"))  # the old key still signs
    after = verify_db(db, witnesses=read_witness(str(db) + ".witness.jsonl"))
    assert after.ok and after.entries == 8, after.problems
    secret = (FIXTURES / "pre-migrations.api-key.txt").read_text().strip()
    with KeyStore(db) as keys:
        assert keys.check(secret).status == "ok" and keys.check(secret).user == "alice"


def test_a_migration_is_never_applied_twice_by_concurrent_starts(store_db: str) -> None:
    errors = raised_in_threads(lambda: Store.open(store_db).close(), 4)
    assert not errors
    conn = connect(store_db)
    try:
        rows = conn.execute("SELECT name FROM distillgate_migrations ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert [r[0] for r in rows] == NAMES


@pytest.mark.parametrize("missing", ["runs"])
def test_an_unrecorded_old_store_without_runs_is_backfilled(tmp_path: Path, missing: str) -> None:
    db = _old_store(tmp_path)
    conn = connect(db)
    conn.execute(f"DROP TABLE {missing}")
    conn.close()
    with Store.open(db) as store:
        assert store.run_owner("old-run") == "internal-compression"
        assert store.run_owner("other-run") == "internal-compression"


def test_the_log_keeps_no_index_on_its_editable_run_column_and_selects_runs_on_the_body(tmp_path: Path) -> None:
    """m009: the column index cost every append an index insert and no read used it; a run's entries are still
    found through the index over the hashed body's field (an old store loses the index on its first open)."""
    for db in (tmp_path / "new.db", _old_store(tmp_path)):
        with Store.open(db) as store:
            store.admit(policy_from_data(SEED), request(run="r1"))
            conn = connect(db)
            try:
                names = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
                assert "log_run" not in names and "log_body_run" in names
                plan = " ".join(str(r[-1]) for r in conn.execute(
                    f"EXPLAIN QUERY PLAN SELECT idx FROM log WHERE idx >= 0 AND {conn.dialect.body_run} = ?",
                    ("r1",)))
                assert "log_body_run" in plan, plan
                conn.execute("UPDATE log SET run = 'elsewhere'")  # an edited column moves nothing out of the run
            finally:
                conn.close()
            assert [e.body["run"] for e in store.entries(run="r1")] == ["r1"]


def test_the_derived_columns_come_in_the_order_the_table_and_verify_name_them() -> None:
    from distillgate.ledger.entries import COLUMNS, columns

    assert columns({name: f"v-{name}" for name in COLUMNS}) == tuple(f"v-{name}" for name in COLUMNS)
    assert columns({}) == (None,) * len(COLUMNS)
