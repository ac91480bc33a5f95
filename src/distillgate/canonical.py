"""Canonical JSON (sorted keys, no insignificant whitespace, UTF-8) and hashing helpers.

Close to RFC 8785 for the values the log holds (strings, integers, booleans, null, lists, objects); floats are
written in their shortest round-trip form. The same bytes always hash the same, across processes and machines.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

#: the options of ``canonical_json`` (for callers that call ``orjson.dumps`` themselves, on a hot path)
CANONICAL_OPTS = _OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(value, option=_OPTS)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_json(value: Any) -> str:
    return sha256_hex(canonical_json(value))
