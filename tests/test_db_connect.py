"""``db.connect`` on a new SQLite file from several threads at once (gateway workers or replicas starting together).

Switching a new file to WAL mode takes a lock SQLite does not wait for: without a retry, about one start in ten of
four concurrent ones failed with "database is locked" (seen in tests/test_ledger_migrations.py under load).
"""

from __future__ import annotations

from pathlib import Path

from distillgate.db import connect

from _foundation_support import raised_in_threads


def _connect_and_write(path: Path) -> None:
    conn = connect(path)
    try:  # then write at once, as a store's migrations do: the others' mode switch meets this lock
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("COMMIT")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_concurrent_first_connections_to_a_new_file_all_succeed_in_wal_mode(tmp_path: Path) -> None:
    for round_ in range(60):
        path = tmp_path / f"s{round_}.db"
        errors = raised_in_threads(lambda path=path: _connect_and_write(path), 8)
        assert not errors, (round_, errors[:3])
        check = connect(path)
        try:
            assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 8
        finally:
            check.close()
