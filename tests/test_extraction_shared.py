"""Extraction monitors sharing their windows through the store (extraction/shared.py): traffic spread over two
monitors on one store (SQLite or PostgreSQL) is judged exactly as the same traffic on one monitor: the word-level
windows (from the requests' sketches) and the content signals (from their embedded pieces)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from _extraction_support import (
    coverage_prompts,
    feat,
    legit_banking,
    shuffled_bank,
    template_sweep,
)
from distillgate.db import connect
from distillgate.errors import NotFoundError
from distillgate.extraction import ExtractionMonitor, HashingEmbedder, RequestFeatures, Sketch
from distillgate.extraction.features import Embedded, from_codes, int8_codes
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


def spread(db: str, requests: list[RequestFeatures], shared: bool = True, *,
           make: Callable[[], ExtractionMonitor] = ExtractionMonitor, n: int = 2,
           monitors: list[ExtractionMonitor] | None = None) -> list[list[tuple[str, str, str, float]]]:
    """Round-robin over ``n`` monitors (``make()``, or ``monitors``, left open); each syncs with the store after
    every request (staleness zero)."""
    mine = monitors is None
    monitors = [make() for _ in range(n)] if monitors is None else monitors
    shares = [SharedWindows(m, db, start=False) for m in monitors] if shared else []
    for m, sh in zip(monitors, shares, strict=False):
        m.shared = sh
    out = []
    try:
        for i, f in enumerate(requests):
            k = i % len(monitors)
            out.append(flags(monitors[k].observe(f)))
            for sh in shares[k:] + shares[:k]:  # the one that saw it flushes first, then the others read
                sh.sync()
    finally:
        for sh in shares:
            sh.close()
        for m in monitors if mine else ():
            m.close()
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


def event_rows(store_db: str) -> list[tuple[Any, Any]]:
    """``(origin, record)`` of every row in the monitor events table, in ``seq`` order."""
    sidecar = events_path(store_db)  # SQLite: the events' own file next to the store; PostgreSQL: the store
    conn = connect(sidecar or store_db)
    try:
        if sidecar is None:
            migrate(conn)
        return [tuple(r) for r in conn.execute("SELECT origin, record FROM monitor_events ORDER BY seq").fetchall()]
    finally:
        conn.close()


def test_shared_rows_carry_word_hashes_never_the_words(store_db: str) -> None:
    m = ExtractionMonitor()
    m.shared = SharedWindows(m, store_db, start=False)
    m.observe(feat("my card was stolen, what should I do?", user="bob", key="k-bob"))
    m.shared.sync()
    m.close()
    rows = event_rows(store_db)
    assert len(rows) == 1
    raw = bytes(rows[0][1])
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


# -- the content signals: embedded pieces shared between processes ----------------------------------------------------
BANK = shuffled_bank()
EMBEDDER = HashingEmbedder()


def content_monitor(reference: bool = True) -> ExtractionMonitor:
    """Embeds in the request's thread (no background worker), so that a sync after each request is staleness zero.
    With ``reference``: 1,500 banking messages (a gateway's ``extraction.references``); without, the project's
    first 200 embedded pieces become its reference."""
    m = ExtractionMonitor(embedder=EMBEDDER, background=False)
    if reference:
        m.set_reference("bank", BANK[:1500])
    return m


def off_domain_traffic() -> list[RequestFeatures]:
    """A legitimate banking user (alice) with, every third request, an attack in off-domain prompts: ten hydra
    heads of 4 requests each, then one user (cov) of 36. One process sees the heads by their shared cluster
    (distribution_shift), cov by its own windows (distribution_shift, prompt_drift) and the project's window
    turning (embedding_mmd, after 200 pieces); spread over two processes, each sees 2 of a head's requests and 18
    of cov's, and only 138 of the project's pieces."""
    cov = iter(coverage_prompts(200, seed=9))
    heads = [feat(next(cov), user=f"h{h}", key=f"k-h{h}", run=f"h{h}") for h in range(10) for _ in range(4)]
    mallory = [feat(next(cov), user="cov", key="k-cov", run="cov") for _ in range(36)]
    attack = iter(heads + mallory)
    alice = iter(feat(t, user="alice", key="k-alice", run="a") for t in BANK[3000:3200])
    out = []
    for i in range(276):
        step = next(attack, None) if i % 3 == 2 else None
        out.append(step if step is not None else next(alice))
    return out


Rows = list[list[tuple[str, str, str, float]]]


def first_fired(requests: list[RequestFeatures], rows: Rows) -> dict[tuple[str, str, str], int]:
    """(who, signal, scope) -> index of the first request it fired on; the ten heads count as one ``h``."""
    out: dict[tuple[str, str, str], int] = {}
    for i, (f, row) in enumerate(zip(requests, rows, strict=True)):
        who = "h" if (f.user or "").startswith("h") else f.user or ""
        for name, scope, _, _ in row:
            out.setdefault((who, name, scope), i)
    return out


def content(first: dict[tuple[str, str, str], int], who: str) -> set[str]:
    return {name for (w, name, _) in first if w == who}


CONTENT = {"prompt_drift", "distribution_shift", "embedding_mmd"}


def test_content_signals_of_an_attack_spread_over_two_processes_are_those_of_one(store_db: str, tmp_path: Any) -> None:
    requests = off_domain_traffic()
    one_db = str(tmp_path / "one.db")  # one process sharing alone (its vectors go through the same codes)
    alone = spread(one_db, requests, make=content_monitor, n=1)
    together = spread(store_db, requests, make=content_monitor)
    assert together == alone  # every request: the same signals, scopes and values
    first = first_fired(requests, alone)
    assert content(first, "cov") == CONTENT and content(first, "h") == {"distribution_shift"}
    assert not content(first, "alice")  # the legitimate user: no signal of any scope
    assert first_fired(requests, spread(one_db, requests, False, make=content_monitor, n=1)) == first  # unshared

    apart = first_fired(requests, spread(store_db, requests, False, make=content_monitor))
    assert "prompt_drift" not in content(apart, "cov")  # 18 requests each, under min_requests 20
    assert not content(apart, "h")  # 2 pieces of a head each: no evidence of its own to attach the cluster's shift
    assert "embedding_mmd" not in {name for (_, name, _) in apart}  # 138 pieces each: the window never fills
    assert not content(apart, "alice")


def window_counts(m: ExtractionMonitor) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """Per scope: embedded requests, distinct pieces, pieces outside the reference, the project's MMD window."""
    return {k: (len(st.drift), len(st.outside), st.outside.true, len(st.vectors)) for k, st in m._scopes.items()}


def test_each_piece_is_applied_once_in_every_process(store_db: str, tmp_path: Any) -> None:
    """The publisher applies its own pieces when they are embedded and never again from the store; the others
    apply each once: every process's windows hold what one process's hold."""
    requests = off_domain_traffic()[:150]
    one = content_monitor()
    spread(str(tmp_path / "one.db"), requests, monitors=[one])
    pair = [content_monitor(), content_monitor()]
    spread(store_db, requests, monitors=pair)
    try:
        expected = window_counts(one)
        assert expected[("project", "bank")][3] == 150 and expected[("user", "cov")][0] == 10
        assert window_counts(pair[0]) == window_counts(pair[1]) == expected
        assert [m.shared.applied_embedded for m in pair if m.shared] == [75, 75]  # the other's 75, none of its own
    finally:
        for m in (one, *pair):
            m.close()


def test_a_bootstrap_reference_is_made_of_the_same_pieces_in_every_process(store_db: str, tmp_path: Any) -> None:
    """Without a configured reference, a project's first 200 pieces become it. A shared process applies none of
    them itself: they come back from the store in seq order, to it as to the others, so that every process builds
    the reference of the same first 200 (not its own first, nor any twice)."""
    legit = [feat(t, user="bob", key="k-bob", run="b") for t in BANK[:200]]
    requests = legit + off_domain_traffic()
    one = content_monitor(reference=False)
    alone = spread(str(tmp_path / "one.db"), requests, monitors=[one])
    pair = [content_monitor(reference=False), content_monitor(reference=False)]
    together = spread(store_db, requests, monitors=pair)
    try:
        assert together == alone
        first_200 = from_codes(int8_codes(EMBEDDER.embed(BANK[:200])))
        for m in (one, *pair):
            ref = m.reference("bank")
            assert ref is not None and np.array_equal(ref.vectors, first_200)
        assert one.shared is not None and one.shared.applied_embedded == 200  # its own deferred pieces, once each
        first = first_fired(requests, alone)
        assert "distribution_shift" in content(first, "h") and "prompt_drift" in content(first, "cov")
        assert not content(first, "alice") and not content(first, "bob")
    finally:
        for m in (one, *pair):
            m.close()
    apart = spread(store_db, requests, False, make=lambda: content_monitor(reference=False))
    assert not any(apart)


def test_shared_pieces_carry_vector_codes_and_hashes_never_the_text(store_db: str) -> None:
    m = content_monitor()
    secret = "Zebulon asks about volcanology and maritime law, account 12345678"
    m.observe(feat(secret, user="bob", key="k-bob"))
    assert m.shared is None
    m.shared = SharedWindows(m, store_db, start=False)
    m.observe(feat(secret, user="bob", key="k-bob"))
    m.shared.sync()
    origin = m.shared.origin
    applied = m._scopes[("project", "bank")].vectors[-1]
    m.close()
    rows = event_rows(store_db)
    assert [str(o) for o, _ in rows] == [origin, origin]  # the sketch, then its pieces (applied here: a reference)
    raw = bytes(rows[1][1])
    for word in ("zebulon", "volcanology", "maritime", "12345678"):
        assert word not in raw.lower().decode()
    rec = orjson.loads(raw)
    assert rec["kind"] == "embedded" and set(rec) == {"v", "kind", "user", "key_id", "project", "scopes", "keys",
                                                      "dim", "codes", "boot"}
    back = Embedded.from_record(rec)
    assert back.codes.shape == (1, EMBEDDER.dim) and np.array_equal(back.vectors[0], applied)
    assert ("user", "bob") in back.scopes and ("project", "bank") in back.scopes


def test_a_bootstrap_reference_is_the_same_in_every_process_with_a_stale_view(store_db: str) -> None:
    """Two processes reading each other only every 25 requests (far beyond the staleness bound): each still
    builds its reference of the same pieces, the first 200 in seq order, not the first 200 it happened to see."""
    pair = [content_monitor(reference=False), content_monitor(reference=False)]
    shares = [SharedWindows(m, store_db, start=False) for m in pair]
    for m, sh in zip(pair, shares, strict=True):
        m.shared = sh
    try:
        for i, t in enumerate(BANK[:300]):
            pair[i % 2].observe(feat(t, user=f"u{i % 7}", key=f"k{i % 7}", run="r"))
            if i % 25 == 24:
                for sh in (*shares, *shares):  # both commit, then both have read everything
                    sh.sync()
        refs = [m.reference("bank") for m in pair]
        assert refs[0] is not None and refs[1] is not None
        assert np.array_equal(refs[0].vectors, refs[1].vectors)
        # 200 of the first 225 pieces sent, none twice
        sent = Counter(v.tobytes() for v in from_codes(int8_codes(EMBEDDER.embed(BANK[:225]))))
        got = Counter(v.tobytes() for v in refs[0].vectors)
        assert sum(got.values()) == 200 and got <= sent
    finally:
        for m in pair:
            m.close()
