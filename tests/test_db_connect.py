"""``db.connect`` on a new SQLite file from several threads at once (gateway workers or replicas starting together).

Switching a new file to WAL mode takes a lock SQLite does not wait for: without a retry, about one start in ten of
four concurrent ones failed with "database is locked" (seen in tests/test_ledger_migrations.py under load).
"""

from __future__ import annotations

import threading
from pathlib import Path

from distillgate.db import connect


def test_concurrent_first_connections_to_a_new_file_all_succeed_in_wal_mode(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    for round_ in range(60):
        path = tmp_path / f"s{round_}.db"
        start = threading.Barrier(8)

        def one(path: Path = path, start: threading.Barrier = start) -> None:
            try:
                start.wait()
                conn = connect(path)
                try:  # then write at once, as a store's migrations do: the others' mode switch meets this lock
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
                    conn.execute("INSERT INTO t VALUES (1)")
                    conn.execute("COMMIT")
                    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
                finally:
                    conn.close()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, (round_, errors[:3])
        check = connect(path)
        try:
            assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 8
        finally:
            check.close()
