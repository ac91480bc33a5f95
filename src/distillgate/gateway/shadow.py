"""Shadow agreement of a route: per slice, the last ``window`` student-vs-teacher comparisons, kept in the store.

A shadowed request (a sample of the traffic a route sent to the student) is also answered by the teacher; whether
the two answers agree is one row of ``route_shadow`` (in the gateway's store, beside the decision log and the
API keys). Only the last ``window`` rows of each (route, slice) are kept, so the table stays small and the window
survives a restart.

Drift: the evaluated agreement ``p0`` was measured on ``n0`` items, so it is known to within its 95 % Wilson
interval ``[lo0, hi0]``. A slice has drifted when its window holds at least ``min_samples`` comparisons and its
agreement is below ``lo0`` -- below the evaluated level by more than the evaluation's own uncertainty.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from distillgate.db import connect
from distillgate.ledger.schema import migrate


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Window:
    """A slice's window: ``agree`` of ``n`` comparisons agreed."""

    agree: int
    n: int

    @property
    def agreement(self) -> float | None:
        return self.agree / self.n if self.n else None


class ShadowLog:
    """The ``route_shadow`` table of one store file (thread-safe; one connection)."""

    def __init__(self, db: str | Path) -> None:
        self._conn = connect(db)
        migrate(self._conn)  # the table is m007 of ledger/schema.py
        self._begin = "BEGIN IMMEDIATE" if self._conn.dialect.name == "sqlite" else "BEGIN"
        self._lock = threading.Lock()

    def record(self, route: str, slice_key: str, agree: bool, request_hash: str, window: int) -> Window:
        """Add one comparison, drop what fell out of the window, return the window."""
        with self._lock:
            self._conn.execute(self._begin)
            try:
                self._conn.execute("INSERT INTO route_shadow (route, slice, at, agree, request_hash) "
                                   "VALUES (?, ?, ?, ?, ?)", (route, slice_key, time.time(), int(agree), request_hash))
                self._conn.execute(
                    "DELETE FROM route_shadow WHERE route = ? AND slice = ? AND id <= (SELECT id FROM route_shadow "
                    "WHERE route = ? AND slice = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (route, slice_key, route, slice_key, window))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.rollback_quietly()
                raise
        return self.window(route, slice_key, window)

    def window(self, route: str, slice_key: str, window: int) -> Window:
        with self._lock:
            row = self._conn.execute(
                "SELECT COALESCE(SUM(agree), 0), COUNT(*) FROM (SELECT agree FROM route_shadow WHERE route = ? AND "
                "slice = ? ORDER BY id DESC LIMIT ?) AS w", (route, slice_key, window)).fetchone()
        return Window(int(row[0]), int(row[1]))

    def slices(self, route: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute(
                "SELECT DISTINCT slice FROM route_shadow WHERE route = ? ORDER BY slice", (route,)).fetchall()]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
