"""A student checkpoint leaving the study: ``export_student(store, policies, train_dir, to, user=...)``.

Judged by the shared gate (``distillgate.data.gate.judge`` with ``kind="export"``, ``artifact="student"``: the
policy's destinations and, with ``review.required``, the sign-off of the dataset version the student was trained
on), logged as a decision either way; then ``model/`` and ``run.json`` are written under ``<to>/`` and an
``export`` event lists the files with their sha256.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from distillgate.data.gate import judge
from distillgate.destinations import write_files
from distillgate.errors import NotFoundError, UserError
from distillgate.ledger.canonical import sha256_hex
from distillgate.ledger.store import Store
from distillgate.policy.model import PolicySet


def export_student(store: Store, policies: PolicySet, train_dir: str | Path, to: str, *, user: str,
                   project: str | None = None, run: str | None = None) -> list[str]:
    """Export the trained student in ``train_dir`` (``model/`` + ``run.json``) to ``to``; return the written URLs."""
    root = Path(train_dir)
    record_path, model_dir = root / "run.json", root / "model"
    if not record_path.is_file() or not model_dir.is_dir():
        raise NotFoundError(f"{root} holds no trained student (run.json and model/)",
                            hint="pass the training output directory of a finished run")
    record = orjson.loads(record_path.read_bytes())
    card = record.get("provenance") or {}
    project, run = project or card.get("project"), run or card.get("run")
    if not project or not run:
        raise UserError(f"the run record of {root} names no project and run",
                        hint="pass --project and --run (the run whose sign-offs cover the student's dataset)")
    version_id = (record.get("dataset") or {}).get("dataset_version")
    admission = judge(store, policies, kind="export", artifact="student", user=user, project=project, run=run,
                      version_id=version_id, destination=to)
    files = {"run.json": record_path.read_bytes()}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            files[f"model/{path.relative_to(model_dir).as_posix()}"] = path.read_bytes()
    urls = write_files(to, files)
    store.append_event("export", {"artifact": "student", "run": run, "project": project, "user": user,
                                  "destination": to, "version_id": version_id,
                                  "decision_index": admission.entry.index,
                                  "files": {n: {"sha256": sha256_hex(d), "bytes": len(d)} for n, d in files.items()}})
    return urls
