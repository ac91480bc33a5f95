"""The stamp's signature: libsodium's where the system has it, byte-identical to OpenSSL's (Ed25519 is
deterministic), and the key's own signature otherwise."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from distillgate import sodium
from distillgate.gateway.stamps import Stamp, issue_stamp
from distillgate.ledger.signing import Signer


@pytest.mark.parametrize("data", [b"", b"x", b'{"a":1}', bytes(range(256)) * 40, "é€😀".encode()])
def test_fast_sign_equals_the_keys_own_signature(data: bytes) -> None:
    key = Ed25519PrivateKey.generate()
    assert sodium.fast_sign(key)(data) == key.sign(data)


def test_without_libsodium_the_keys_own_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sodium, "_loaded", False)
    monkeypatch.setattr(sodium, "_lib", None)
    monkeypatch.setenv("DISTILLGATE_NO_SODIUM", "1")
    key = Ed25519PrivateKey.generate()
    assert sodium.fast_sign(key) == key.sign
    monkeypatch.setattr(sodium, "_loaded", False)  # the next test loads it again


def test_issued_stamp_verifies_and_matches_sign_json() -> None:
    signer = Signer.generate()
    stamp = issue_stamp(signer, entry_index=3, entry_hash="e" * 64, policy_id="p", policy_hash="h", user="u",
                        project="pr", run=None, model="m", upstream_id=None, request_hash="r" * 64,
                        response_hash="s" * 64)
    assert stamp.signature == signer.sign_json(stamp.payload)  # the same bytes as the Signer's own
    assert stamp.verify(signer.public_key_pem())
    assert Stamp.from_header(stamp.header_value()) == stamp


@pytest.mark.parametrize("user", [None, 'x","upstream_id":"y', ',"upstream_id":', "é\\\"", "zz"])
def test_header_is_the_canonical_json_for_hostile_strings(user: str | None) -> None:
    import base64

    from distillgate.canonical import canonical_json

    signer = Signer.generate()
    for upstream_id in (None, "chatcmpl-1", ',"upstream_id":'):
        stamp = issue_stamp(signer, entry_index=1, entry_hash="e", policy_id=',"upstream_id":', policy_hash="h",
                            user=user, project=user, run=user, model=user, upstream_id=upstream_id,
                            request_hash="r", response_hash="s")
        raw = base64.urlsafe_b64decode(stamp.header_value() + "=" * (-len(stamp.header_value()) % 4))
        assert raw == canonical_json(stamp.as_dict())
        assert Stamp.from_header(stamp.header_value()) == stamp and stamp.verify(signer.public_key_pem())


def test_the_logs_signatures_are_the_keys_own_bytes(tmp_path) -> None:
    """Checkpoints and signed heads go through the same signer: byte-identical to OpenSSL's, verified by the
    public key alone; where libsodium loads, it is the one signing (the cheaper path is not silently unused)."""
    import base64

    from distillgate.ledger.signing import verify_bytes

    signer = Signer.load_or_create(tmp_path / "k.pem")
    for data in (b"", b'{"head":"0"}', bytes(range(256)) * 8):
        sig = signer.sign(data)
        assert base64.b64decode(sig) == signer._key.sign(data)
        assert verify_bytes(signer.public_key_pem(), data, sig)
    if sodium._library() is not None:
        assert signer.raw_sign != signer._key.sign
