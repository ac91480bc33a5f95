"""Moved to :mod:`distillgate.keys` (shared by the gateway and the review web app); kept for old imports."""

from distillgate.keys import ApiKey, KeyCheck, KeyStore, SideTable, now_iso

__all__ = ["ApiKey", "KeyCheck", "KeyStore", "SideTable", "now_iso"]
