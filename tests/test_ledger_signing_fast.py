"""Signatures through libsodium (ledger/sodium.py) are byte for byte those of ``cryptography``: Ed25519 is
deterministic, so a stamp or checkpoint verifies the same whichever library signed it."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from distillgate.canonical import canonical_json
from distillgate.ledger.signing import Signer, verify_bytes, verify_json
from distillgate.ledger.sodium import SodiumKey


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
