"""The ledger's cheaper per-commit paths give what the plain ones gave: ``iso_now`` is ``iso(utc_now())``, and the
witness line of each commit is the signed head stored in ``meta``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import orjson

from distillgate.ledger.records import iso, iso_now, utc_now
from distillgate.ledger.signing import verify_json
from distillgate.ledger.store import Store
from distillgate.ledger.witness import read_witness


def test_iso_now_is_iso_of_utc_now() -> None:
    for _ in range(1000):  # crosses second boundaries now and then: the cached text must follow
        before = iso(utc_now())
        now = iso_now()
        after = iso(utc_now())
        assert before <= now <= after
        assert len(now) == len(before) and now.endswith("Z")
        assert iso(datetime.fromisoformat(now)) == now


def test_the_witness_holds_each_commits_signed_head_as_stored(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db", checkpoint_every=2) as store:
        for i in range(5):
            store.append_event("note", {"i": i})
        head = store.head()
        signer = store.signer
    assert head is not None
    lines = (tmp_path / "s.db.witness.jsonl").read_bytes().splitlines()
    assert orjson.loads(lines[-1]) == head.as_dict()
    seen = read_witness(tmp_path / "s.db.witness.jsonl")
    assert [w.tree_size for w in seen] == [1, 2, 2, 3, 4, 4, 5]  # checkpoints at 2 and 4, and every commit's head
    assert all(verify_json(signer.public_key_pem(), w.payload(), w.signature) for w in seen)


def test_quick_records_equal_the_frozen_init() -> None:
    """The records built through their ``__dict__`` (two or more per request) are those ``__init__`` builds: equal,
    same hash and repr, still frozen."""
    import dataclasses

    import pytest

    from distillgate.ledger.charging import Charge, charge
    from distillgate.ledger.records import Admission, LogEntry, Reservation

    body = {"kind": "note", "index": 3}
    assert LogEntry.quick(3, "ab" * 32, body) == LogEntry(3, "ab" * 32, body)
    args = ("r1", 7, "p", "u", "run", "2026-01-01", 84, 1, "held")
    res = Reservation.quick(*args)
    assert res == Reservation(*args) and hash(res) == hash(Reservation(*args)) and repr(res) == repr(Reservation(*args))
    assert res.with_state("settled") == dataclasses.replace(res, state="settled")
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.state = "settled"  # type: ignore[misc]
    decision = object()  # any value will do for the comparison
    entry = LogEntry(1, "cd" * 32, {})
    assert Admission.quick(decision, entry, "r1", 5, 1) == Admission(decision, entry, "r1", 5, 1)  # type: ignore[arg-type]
    c = charge(res, outcome="ok", prompt_tokens=80, completion_tokens=10, records=1)
    assert c == Charge(84, 1, "settled", 6, False, ("USAGE_OVERRUN",))
    assert c.counter_deltas(res) == (0, 0)


def test_usage_is_the_usage_decide_is_given(tmp_path: Path) -> None:
    from distillgate.policy.decision import Usage

    with Store.open(tmp_path / "s.db") as store:
        store.append_event("note", {})

        def job(txn):  # type: ignore[no-untyped-def]
            txn.apply("p", "u", "r", txn.day, 30, 2)
            return txn.usage("p", "u", "r", txn.day), txn.usage(None, None, None, txn.day)

        got, empty = store._call(job)
        assert got == Usage(tokens_today_project=30, tokens_today_user=30, records_run=2, run_project=None)
        assert empty == Usage()


def test_frontier_append_digest_is_append() -> None:
    import hashlib

    from distillgate.ledger.merkle import Frontier, Tree

    a, b = Frontier(), Frontier()
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(37)]
    for h in hashes:
        a.append(h)
        b.append_digest(bytes.fromhex(h))
        assert a == b
    assert b.root() == Tree(hashes).root()
