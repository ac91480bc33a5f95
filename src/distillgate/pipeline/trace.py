"""``distillgate audit trace STUDENT``: walk from a trained student back to the signed decisions behind it.

From the student's run record (``<train dir>/run.json``) to its frozen dataset version, to every row it trained on,
to the decision-log entry that allowed each row's teacher call (the row's provenance stamp names its
``entry_index`` and ``entry_hash``; the stamp's signature is checked with the store's public key, the entry must be
an allowed ``decision`` with that hash, and a signed checkpoint must cover it), and to the sign-offs of the version.
A row whose chain breaks anywhere is reported; so is a version nobody signed off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from distillgate.data.guard import training_input
from distillgate.data.signoff import signoffs
from distillgate.errors import IntegrityError, NotFoundError
from distillgate.gateway.stamps import Stamp
from distillgate.ledger.store import Store


@dataclass
class Trace:
    student: str
    version_id: str
    rows: int
    decisions: int
    broken: list[tuple[str, str]] = field(default_factory=list)  # (row_id, why)
    signed_off_by: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.broken and bool(self.signed_off_by)

    def as_dict(self) -> dict[str, Any]:
        return {"student": self.student, "version_id": self.version_id, "rows": self.rows,
                "decisions": self.decisions, "rows_without_signed_decision": [
                    {"row_id": r, "why": w} for r, w in self.broken],
                "signoffs": self.signed_off_by, "checkpoint": self.checkpoint, "ok": self.ok}


def _record(student: Path) -> dict[str, Any]:
    for candidate in (student / "run.json", student.parent / "run.json", student):
        if candidate.is_file():
            record: dict[str, Any] = orjson.loads(candidate.read_bytes())
            return record
    raise NotFoundError(f"no run record (run.json) for student {str(student)!r}",
                        hint="pass the training output directory (it holds run.json and model/)")


def trace(student: str | Path, store: Store) -> Trace:
    record = _record(Path(student))
    dataset = record.get("dataset") or {}
    version_dir = dataset.get("version_dir")
    if not version_dir:
        raise IntegrityError(f"the run record of {student} names no frozen dataset version",
                             hint="the student was trained before training took frozen versions; retrain it")
    config = record.get("config") or {}
    rows = training_input(version_dir, splits=config.get("splits") or ("train",)).rows
    card = record.get("provenance") or {}
    project, run = card.get("project"), card.get("run")
    pem = store.signer.public_key_pem()
    size = max((cp.tree_size for cp in store.checkpoints()), default=0)
    broken: list[tuple[str, str]] = []
    seen: set[int] = set()
    for row in rows:
        row_id, raw = str(row["row_id"]), row.get("stamp")
        if not isinstance(raw, dict):
            broken.append((row_id, "no provenance stamp"))
            continue
        try:
            stamp = Stamp.from_dict(raw)
        except IntegrityError as exc:
            broken.append((row_id, exc.message))
            continue
        index = int(stamp.payload["entry_index"])
        if not stamp.verify(pem):
            broken.append((row_id, "the stamp's signature does not verify with this store's key"))
            continue
        try:
            entry = store.entry(index)
        except NotFoundError:
            broken.append((row_id, f"decision-log entry {index} does not exist"))
            continue
        body = entry.body
        if entry.entry_hash != stamp.payload["entry_hash"] or body.get("kind") != "decision" \
                or body.get("decision") != "allow":
            broken.append((row_id, f"entry {index} is not the allowed decision the stamp names"))
        elif index >= size:
            broken.append((row_id, f"entry {index} is not covered by a signed checkpoint yet"))
        else:
            seen.add(index)
            if run is None:
                project, run = body.get("project"), body.get("run")
    version_id = str(dataset.get("dataset_version"))
    signed = [s.as_dict() for s in signoffs(store, project=project, run=str(run), version_id=version_id)] \
        if run else []
    head = store.checkpoints()[-1].as_dict() if store.checkpoints() else None
    return Trace(str(student), version_id, len(rows), len(seen), broken, signed, head)
