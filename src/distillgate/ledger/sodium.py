"""Ed25519 signing through libsodium, when the system has it: the same signatures at about half the instructions.

Why: every commit of the decision log signs its head and every answer carries a signed stamp, so a request at
concurrency 1 makes three Ed25519 signatures. ``cryptography`` signs with OpenSSL's portable ref10 code (~460 k
instructions a signature, counted by callgrind); libsodium's 64-bit field arithmetic takes ~245 k. Ed25519
signatures are deterministic (RFC 8032), so both libraries give the *same bytes* for the same key and message:
nothing that verifies a stamp or a checkpoint can tell which one signed. A ``ctypes`` call also releases the GIL,
so the writer thread's signature no longer holds up the event loop.

``SodiumKey.load`` returns None (and the caller signs with ``cryptography``) when libsodium is not installed, fails
to initialise, derives another public key from the seed, or signs a test message differently from
``cryptography``: the fast path is used only where it was just shown to agree.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_Signature = ctypes.c_char * 64
_SELF_TEST = b'{"distillgate":"libsodium and cryptography must sign this alike"}'
#: the usual file names first (no ``ldconfig`` run), then whatever ``ctypes.util`` finds
_NAMES = ("libsodium.so.23", "libsodium.so.26", "libsodium.dylib")


def _open() -> ctypes.CDLL | None:
    for name in _NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    found = ctypes.util.find_library("sodium")
    try:
        return None if found is None else ctypes.CDLL(found)
    except OSError:
        return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = _open()
    if lib is None:
        return None
    try:
        if lib.sodium_init() < 0:
            return None
        lib.crypto_sign_seed_keypair.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.crypto_sign_seed_keypair.restype = ctypes.c_int
        lib.crypto_sign_detached.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p,
                                             ctypes.c_ulonglong, ctypes.c_char_p]
        lib.crypto_sign_detached.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


class SodiumKey:
    """One Ed25519 private key held for libsodium (its 64-byte secret key: seed and public key)."""

    def __init__(self, lib: ctypes.CDLL, secret: ctypes.Array[ctypes.c_char]) -> None:
        self._sign = lib.crypto_sign_detached
        self._secret = secret

    @classmethod
    def load(cls, key: Ed25519PrivateKey) -> SodiumKey | None:
        """The libsodium form of ``key``, or None when libsodium is missing or does not agree with ``cryptography``."""
        lib = _library()
        if lib is None:
            return None
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = ctypes.create_string_buffer(32)
        secret = ctypes.create_string_buffer(64)
        if lib.crypto_sign_seed_keypair(public, secret, seed) != 0:
            return None
        raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if public.raw != raw_public:
            return None
        fast = cls(lib, secret)
        try:
            agrees = fast.sign(_SELF_TEST) == key.sign(_SELF_TEST)
        except OSError:
            return None
        return fast if agrees else None

    def sign(self, data: bytes) -> bytes:
        sig = _Signature()  # one per call: the writer thread and the event loop both sign
        if self._sign(sig, None, data, len(data), self._secret) != 0:
            raise OSError("libsodium's crypto_sign_detached failed")
        return sig.raw
