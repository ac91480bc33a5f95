"""Re-run the detectors over a stored decision log (``distillgate audit scan``).

Each decision entry whose ``extra.extraction.features`` holds a features record (see ``features_record``) is replayed
through a fresh ``ExtractionMonitor`` in log order; signals recorded live (``extra.extraction.signals``, e.g. the
asynchronous ``prompt_drift``) are kept as well. The result is one ``Session`` per flagged identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distillgate.extraction.features import Sketch, identities
from distillgate.extraction.monitor import ExtractionMonitor
from distillgate.policy.extraction_rules import ExtractionRules, Signal
from distillgate.policy.model import Policy, PolicySet


@dataclass
class Session:
    """One suspicious identity: where it was first flagged and the strongest value of each signal."""

    scope: str
    scope_id: str
    first_index: int
    requests_seen: int
    signals: dict[str, Signal] = field(default_factory=dict)
    live: bool = False  # also flagged when the request was served

    def as_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "scope_id": self.scope_id, "first_index": self.first_index,
                "requests_seen_before_flag": self.requests_seen, "flagged_live": self.live,
                "signals": {name: sig.as_dict() for name, sig in sorted(self.signals.items())}}


@dataclass
class ScanReport:
    entries: int
    replayed: int
    sessions: list[Session]

    def as_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "replayed": self.replayed,
                "sessions": [s.as_dict() for s in self.sessions]}


def scan_entries(entries: Iterable[tuple[int, Mapping[str, Any]]],
                 policies: Policy | PolicySet | ExtractionRules | None = None) -> ScanReport:
    """``entries``: (log index, entry body) in log order."""
    monitor = ExtractionMonitor(policies, embedder=None, max_scopes=1_000_000)
    sessions: dict[tuple[str, str], Session] = {}
    seen: dict[tuple[str, str], int] = {}
    total = replayed = 0
    for index, body in entries:
        total += 1
        extraction = (body.get("extra") or {}).get("extraction") if body.get("kind") == "decision" else None
        if not isinstance(extraction, Mapping) or "features" not in extraction:
            continue
        replayed += 1
        sketch = Sketch.from_record(extraction["features"])
        for scope, ident in identities(sketch):
            seen[(scope, ident)] = seen.get((scope, ident), 0) + 1
        found = list(monitor.observe_sketch(sketch))
        live = [Signal.from_dict(d) for d in extraction.get("signals") or []]
        for sig, is_live in [*((s, False) for s in found), *((s, True) for s in live)]:
            key = (sig.scope, sig.scope_id)
            session = sessions.get(key)
            if session is None:
                session = sessions[key] = Session(sig.scope, sig.scope_id, index, seen.get(key, 0))
            session.live = session.live or is_live
            best = session.signals.get(sig.name)
            if best is None or sig.value > best.value:
                session.signals[sig.name] = sig
    ordered = sorted(sessions.values(), key=lambda s: (s.first_index, s.scope, s.scope_id))
    return ScanReport(total, replayed, ordered)



def scan_store(db: str, policies: Policy | PolicySet | ExtractionRules | None = None) -> ScanReport:
    from distillgate.ledger.store import Store

    with Store.open(db) as store:
        return scan_entries(((e.index, e.body) for e in store.entries(kind="decision")), policies)
