"""Extraction monitors sharing their windows through the store (extraction/shared.py): traffic spread over two
monitors on one store (SQLite or PostgreSQL) is judged exactly as the same traffic on one monitor."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from _extraction_support import feat, legit_banking, template_sweep
from distillgate.db import connect
from distillgate.errors import NotFoundError
from distillgate.extraction import ExtractionMonitor, RequestFeatures, Sketch
from distillgate.extraction.shared import SharedWindows, events_path
from distillgate.ledger.schema import migrate


def logit_bias_sweep(n: int) -> list[RequestFeatures]:
    return [feat("Say one word.", user="mallory", key="k-mallory", max_tokens=1, logprobs=True, top_logprobs=5,
                 logit_bias=((1000 + i, 100.0),)) for i in range(n)]


def traffic() -> list[RequestFeatures]:
    """Three users interleaved: a logit-bias sweep, a template sweep, a legitimate banking classifier."""
    streams = [logit_bias_sweep(24), template_sweep(40, user="eve", key="k-eve"), legit_banking(30)]
    out = []
    for batch in itertools.zip_longest(*streams):
        out.extend(f for f in batch if f is not None)
    return out


def flags(signals: Any) -> list[tuple[str, str, str, float]]:
    return sorted((s.name, s.scope, s.scope_id, round(s.value, 6)) for s in signals)


def one_monitor(requests: list[RequestFeatures]) -> list[list[tuple[str, str, str, float]]]:
    m = ExtractionMonitor()
    return [flags(m.observe(f)) for f in requests]


def spread(db: str, requests: list[RequestFeatures], shared: bool = True) -> list[list[tuple[str, str, str, float]]]:
    """Round-robin over two monitors; each syncs with the store after every request (staleness zero)."""
    monitors = [ExtractionMonitor(), ExtractionMonitor()]
    shares = [SharedWindows(m, db, start=False) for m in monitors] if shared else []
    for m, sh in zip(monitors, shares, strict=False):
        m.shared = sh
    out = []
    try:
        for i, f in enumerate(requests):
            out.append(flags(monitors[i % 2].observe(f)))
            for sh in shares[i % 2:] + shares[:i % 2]:  # the one that saw it flushes first, then the other reads
                sh.sync()
    finally:
        for sh in shares:
            sh.close()
    return out


def test_two_monitors_on_one_store_judge_as_one(store_db: str) -> None:
    requests = traffic()
    alone = one_monitor(requests)
    together = spread(store_db, requests)
    assert together == alone
    fired = {name for row in alone for name, *_ in row}
    assert {"logit_bias_sweep", "template_sweep"} <= fired  # the traffic is an attack that one monitor sees
    alice = [row for f, row in zip(requests, alone, strict=True) if f.user == "alice"]
    assert not any(any(scope in ("user", "key") for _, scope, *_ in row) for row in alice)  # the legit user: clean


def test_without_sharing_the_spread_attack_goes_unseen(store_db: str) -> None:
    """The regression this module exists for: half the sweep per monitor stays under the threshold."""
    requests = logit_bias_sweep(24)
    assert any(row for row in one_monitor(requests))
    apart = spread(store_db, requests, shared=False)
    assert not any(name == "logit_bias_sweep" for row in apart for name, *_ in row)


def test_a_restarted_process_reads_the_recent_windows_first(store_db: str) -> None:
    """A worker that restarts (or a replica that joins) backfills: the attacker's earlier requests still count."""
    first = ExtractionMonitor()
    first.shared = SharedWindows(first, store_db, start=False)
    sweep = logit_bias_sweep(20)
    for f in sweep[:15]:  # 15 distinct patterns: one short of the threshold
        assert not any(s.name == "logit_bias_sweep" for s in first.observe(f))
    first.shared.sync()
    first.close()
    fresh = ExtractionMonitor()
    fresh.shared = SharedWindows(fresh, store_db, start=False)
    fresh.shared.sync()
    assert fresh.shared.applied == 15
    assert any(s.name == "logit_bias_sweep" for s in fresh.observe(sweep[15]))
    fresh.close()


def test_shared_rows_carry_word_hashes_never_the_words(store_db: str) -> None:
    m = ExtractionMonitor()
    m.shared = SharedWindows(m, store_db, start=False)
    m.observe(feat("my card was stolen, what should I do?", user="bob", key="k-bob"))
    m.shared.sync()
    m.close()
    sidecar = events_path(store_db)  # SQLite: the events' own file next to the store; PostgreSQL: the store
    conn = connect(sidecar or store_db)
    try:
        if sidecar is None:
            migrate(conn)
        rows = conn.execute("SELECT record FROM monitor_events").fetchall()
    finally:
        conn.close()
    assert len(rows) == 1
    raw = bytes(rows[0][0])
    assert b"stolen" not in raw and b"card" not in raw
    back = Sketch.from_record(orjson.loads(raw))
    assert back.word_set == Sketch.of(feat("my card was stolen, what should I do?")).word_set
    assert back.word_set is not None and len(back.word_set) == 8


def test_a_store_away_keeps_the_outbox_and_shares_it_later(tmp_path: Any) -> None:
    """An unreachable store (here a directory that does not exist yet) loses nothing queued."""
    db = tmp_path / "later" / "store.db"
    m = ExtractionMonitor()
    m.shared = SharedWindows(m, str(db), start=False)
    m.observe(feat("hello there", user="bob", key="k-bob"))
    with pytest.raises(NotFoundError, match="does not exist"):
        m.shared.sync()
    db.parent.mkdir()
    m.shared.sync()
    assert m.shared.published == 1
    m.close()


def test_on_sqlite_sharing_never_writes_the_store_so_no_ledger_writer_reloads(tmp_path: Any) -> None:
    """Every commit to a SQLite store's file changes its data_version, which makes each ledger writer on it reload
    its cached counters and chain head (and the flush would take the store's write lock): the events go to a file
    of their own."""
    db = str(tmp_path / "store.db")
    watcher = connect(db)
    try:
        migrate(watcher)
        (before,) = watcher.execute("PRAGMA data_version").fetchone()
        m = ExtractionMonitor()
        m.shared = SharedWindows(m, db, start=False)
        for i in range(5):
            m.observe(feat(f"message number {i} about my card", user="bob", key="k-bob"))
            m.shared.sync()
        m.close()
        (after,) = watcher.execute("PRAGMA data_version").fetchone()
        (in_store,) = watcher.execute("SELECT count(*) FROM monitor_events").fetchone()
    finally:
        watcher.close()
    assert after == before and in_store == 0
    sidecar = connect(str(events_path(db)))
    try:
        assert sidecar.execute("SELECT count(*) FROM monitor_events").fetchone()[0] == 5
    finally:
        sidecar.close()
