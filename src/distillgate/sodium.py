"""Ed25519 signatures through the system's libsodium (ctypes), where it is installed: the same bytes as OpenSSL's.

Ed25519 (RFC 8032) is deterministic: a key signs a message one way only, so libsodium's signature is byte for byte
the one ``cryptography`` (OpenSSL) makes; only the cost differs (under callgrind, OpenSSL's portable code takes
about 466 k instructions per signature, libsodium's about 263 k). The gateway signs one stamp per request on its
event loop, so this is a sixth of the loop's instructions per request.

:func:`fast_sign` returns a ``sign(data) -> bytes`` for an ``Ed25519PrivateKey``: libsodium's when the library
loads and its signature of a probe message equals the key's own (a libsodium built non-deterministic, or any other
mismatch, falls back), else the key's own ``sign``. ``DISTILLGATE_NO_SODIUM=1`` forces the fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_PROBE = b'{"distillgate":"libsodium probe"}'
_lock = threading.Lock()
_lib: Any = None
_loaded = False


def _library() -> Any:
    """libsodium, initialised, with the two functions typed; None when it is not there or does not start."""
    global _lib, _loaded
    with _lock:
        if _loaded:
            return _lib
        _loaded = True
        if os.environ.get("DISTILLGATE_NO_SODIUM"):
            return None
        lib = None
        for name in ("libsodium.so.23", "libsodium.so.26", ctypes.util.find_library("sodium")):
            if not name:
                continue
            try:  # PyDLL: the call keeps the GIL, as cryptography's sign does (a ~25 us release on the event
                # loop would hand the GIL to a busy thread and wait to get it back)
                lib = ctypes.PyDLL(name)
                break
            except OSError:
                continue
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
        except AttributeError:
            return None
        _lib = lib
        return lib


def fast_sign(key: Ed25519PrivateKey) -> Callable[[bytes], bytes]:
    """``key.sign``, or libsodium's equal and cheaper signature (see the module docstring)."""
    lib = _library()
    if lib is None:
        return key.sign
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = ctypes.create_string_buffer(32)
    secret = ctypes.create_string_buffer(64)
    if lib.crypto_sign_seed_keypair(public, secret, seed) != 0:
        return key.sign
    detached = lib.crypto_sign_detached
    sk = secret.raw  # bytes: passed as char* without a copy, read-only
    buffer = ctypes.c_char * 64

    def sign(data: bytes) -> bytes:
        out = buffer()  # per call: any thread may sign
        if detached(out, None, data, len(data), sk) != 0:
            return key.sign(data)
        return out.raw

    try:
        if sign(_PROBE) != key.sign(_PROBE):
            return key.sign
    except Exception:  # anything odd about the library: the key's own signature
        return key.sign
    return sign
