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
