"""Ed25519 signing of canonical JSON: checkpoints, log heads and provenance stamps.

The private key lives in a PEM file (mode 0600) created on first use: ``$DISTILLGATE_SIGNING_KEY`` if set, else
``<db path>.signing-key.pem``. Verification needs only the public key (``distillgate audit pubkey``).
"""

from __future__ import annotations

import base64
import os
import uuid
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from distillgate.canonical import canonical_json, sha256_hex
from distillgate.errors import IntegrityError
from distillgate.sodium import fast_sign


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


class Signer:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        #: the key's signature, through libsodium where it loads (the same bytes, cheaper: distillgate.sodium)
        self.raw_sign = fast_sign(private_key)
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> Signer:
        p = Path(path)
        if p.exists():
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise IntegrityError(f"{p} does not hold an Ed25519 private key")
            return cls(key)
        signer = cls.generate()
        pem = signer._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # threads race too
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, p)  # atomic "create if absent": two processes racing keep one key
        except FileExistsError:
            os.unlink(tmp)
            return cls.load_or_create(p)
        os.unlink(tmp)
        return signer

    def public_key_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.raw_sign(data)).decode()

    def sign_json(self, payload: Any) -> str:
        return self.sign(canonical_json(payload))


def default_key_path(db_path: str | Path) -> Path:
    env = os.environ.get("DISTILLGATE_SIGNING_KEY")
    if env:
        return Path(env)
    return Path(str(db_path) + ".signing-key.pem")


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise IntegrityError(f"not a PEM public key: {exc}", hint="use `distillgate audit pubkey` output") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError("the public key is not an Ed25519 key")
    return key


def verify_bytes(public_key_pem: str | bytes, data: bytes, signature_b64: str) -> bool:
    key = load_public_key(public_key_pem)
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_json(public_key_pem: str | bytes, payload: Any, signature_b64: str) -> bool:
    return verify_bytes(public_key_pem, canonical_json(payload), signature_b64)
