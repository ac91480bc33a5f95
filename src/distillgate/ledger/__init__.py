"""Quota ledger and tamper-evident decision log (SQLite by default)."""

from distillgate.ledger.store import Admission, Checkpoint, LogEntry, Store, utc_day

__all__ = ["Admission", "Checkpoint", "LogEntry", "Store", "utc_day"]
