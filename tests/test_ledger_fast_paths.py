"""The ledger's cheaper per-commit paths give what the plain ones gave: libsodium's signatures (ledger/sodium.py) are
byte for byte those of ``cryptography`` (Ed25519 is deterministic), ``iso_now`` is ``iso(utc_now())``, and the
witness line of each commit is the signed head stored in ``meta``."""

from __future__ import annotations

import base64
import os
from datetime import datetime
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from distillgate.canonical import canonical_json
from distillgate.ledger.records import iso, iso_now, utc_now
from distillgate.ledger.signing import Signer, verify_bytes, verify_json
from distillgate.ledger.sodium import SodiumKey
from distillgate.ledger.store import Store
from distillgate.ledger.witness import read_witness


def test_signer_signs_exactly_as_cryptography_does() -> None:
    for _ in range(20):
        key = Ed25519PrivateKey.generate()
        signer = Signer(key)
        for size in (0, 1, 63, 64, 65, 200, 4096):
            data = os.urandom(size)
            sig = signer.sign(data)
            assert base64.b64decode(sig) == key.sign(data)
            assert verify_bytes(signer.public_key_pem(), data, sig)


def test_a_loaded_sodium_key_agrees_and_a_missing_one_falls_back() -> None:
    key = Ed25519PrivateKey.generate()
    fast = SodiumKey.load(key)  # None where the system has no libsodium: the signer then uses cryptography
    payload = {"tree_size": 3, "root_hash": "ab" * 32, "ts": "2026-12-02T00:00:00.000000Z", "key_id": "k"}
    if fast is not None:
        assert fast.sign(canonical_json(payload)) == key.sign(canonical_json(payload))
    signer = Signer(key)
    slow = Signer(key)
    slow._fast = None
    assert signer.sign_json(payload) == slow.sign_json(payload)
    assert verify_json(signer.public_key_pem(), payload, slow.sign_json(payload))


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
