"""The store's typed records: log entries, admissions, checkpoints, reservations; and the clock they use."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from distillgate.policy.decision import Decision

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64


def utc_now() -> datetime:
    return datetime.now(UTC)


def utc_day(now: datetime | None = None) -> str:
    return (now or utc_now()).date().isoformat()  # YYYY-MM-DD, as strftime("%Y-%m-%d") at a fifth of its cost


def iso(now: datetime) -> str:
    return now.isoformat(timespec="microseconds").replace("+00:00", "Z")


@lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).replace(tzinfo=None).isoformat()


def iso_now() -> str:
    """``iso(utc_now())`` (the same clock, the same text) at a fifth of its cost: the text up to the second is made
    once a second. Each log entry and signed head carries one."""
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{_second_text(seconds)}.{micros:06d}Z"


_new = object.__new__


@dataclass(frozen=True)
class LogEntry:
    index: int
    entry_hash: str
    body: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {**self.body, "entry_hash": self.entry_hash}

    @classmethod
    def quick(cls, index: int, entry_hash: str, body: dict[str, Any]) -> LogEntry:
        """``LogEntry(index, entry_hash, body)`` without the frozen ``__init__`` (one ``object.__setattr__`` per
        field): the instance's ``__dict__`` is filled in one call. Equal to the one ``__init__`` makes."""
        obj = _new(cls)
        obj.__dict__.update(index=index, entry_hash=entry_hash, body=body)
        return obj


@dataclass(frozen=True)
class Admission:
    decision: Decision
    entry: LogEntry
    reservation_id: str | None
    tokens_reserved: int
    records_reserved: int

    @classmethod
    def quick(cls, decision: Decision, entry: LogEntry, reservation_id: str | None, tokens_reserved: int,
              records_reserved: int) -> Admission:
        """``Admission(...)`` without the frozen ``__init__`` (see ``LogEntry.quick``)."""
        obj = _new(cls)
        obj.__dict__.update(decision=decision, entry=entry, reservation_id=reservation_id,
                            tokens_reserved=tokens_reserved, records_reserved=records_reserved)
        return obj


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    root_hash: str
    ts: str
    key_id: str
    signature: str

    def payload(self) -> dict[str, Any]:
        return {"tree_size": self.tree_size, "root_hash": self.root_hash, "ts": self.ts, "key_id": self.key_id}

    def as_dict(self) -> dict[str, Any]:
        return {**self.payload(), "signature": self.signature}

    def row(self) -> tuple[int, str, str, str, str]:
        return (self.tree_size, self.root_hash, self.ts, self.key_id, self.signature)


@dataclass(frozen=True)
class Reservation:
    """Quota held for one allowed request until it settles (or is reclaimed). ``state``: held, settled,
    refunded or expired."""

    id: str
    decision_index: int
    project: str | None
    user: str | None
    run: str | None
    day: str
    tokens_reserved: int
    records_reserved: int
    state: str

    #: the columns of ``reservations`` a ``Reservation`` is read from, in field order
    COLUMNS = 'id, decision_index, project, "user", run, day, tokens_reserved, records_reserved, state'

    @classmethod
    def quick(cls, id: str, decision_index: int, project: str | None, user: str | None, run: str | None,
              day: str, tokens_reserved: int, records_reserved: int, state: str) -> Reservation:
        """``Reservation(...)`` without the frozen ``__init__`` (see ``LogEntry.quick``): two per request."""
        obj = _new(cls)
        obj.__dict__.update(id=id, decision_index=decision_index, project=project, user=user, run=run, day=day,
                            tokens_reserved=tokens_reserved, records_reserved=records_reserved, state=state)
        return obj

    def with_state(self, state: str) -> Reservation:
        """This reservation in another state (``dataclasses.replace(self, state=state)``, at a fraction of it)."""
        obj = _new(Reservation)
        obj.__dict__.update(self.__dict__, state=state)
        return obj
