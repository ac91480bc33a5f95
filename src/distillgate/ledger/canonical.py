"""Moved to :mod:`distillgate.canonical` (a shared utility below the ledger and the gateway); kept for old imports."""

from distillgate.canonical import canonical_json, hash_json, sha256_file, sha256_hex

__all__ = ["canonical_json", "hash_json", "sha256_file", "sha256_hex"]
