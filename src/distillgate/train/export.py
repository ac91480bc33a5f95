"""A student's governance: ``judge_training`` before training, ``student_card`` after it (the run record's
``provenance``), and ``export_student`` when a checkpoint leaves the study.

``export_student(store, policies, train_dir, to, user=...)``:
Judged by the shared gate (``distillgate.data.gate.judge`` with ``kind="export"``, ``artifact="student"``: the
policy's destinations and, with ``review.required``, the sign-off of the dataset version the student was trained
on), logged as a decision either way; then ``model/`` and ``run.json`` are written under ``<to>/`` and an
``export`` event lists the files with their sha256.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from distillgate.canonical import sha256_hex
from distillgate.data.gate import judge
from distillgate.data.signoff import signoffs
from distillgate.data.versions import MANIFEST, resolve_version
from distillgate.destinations import write_files
from distillgate.errors import NotFoundError, UserError
from distillgate.ledger.store import Store
from distillgate.policy.model import PolicySet
from distillgate.train.config import TrainConfig


def judge_training(store: Store, policies: PolicySet, config: TrainConfig, *, user: str, project: str,
                   run: str) -> tuple[str, int]:
    """Judge (and log) training ``config``'s frozen version for run ``run`` (``kind="train"``: with
    ``review.required`` its sign-offs); return the version id and the decision's log index. Raises
    ``PolicyDenied`` (``REVIEWER_REQUIRED``, ...) before any row is read for training."""
    from distillgate.train.setup import dataset_of

    version_dir = resolve_version(dataset_of(config))
    version_id = str(orjson.loads((version_dir / MANIFEST).read_bytes())["version_id"])
    admission = judge(store, policies, kind="train", user=user, project=project, run=run, version_id=version_id)
    return version_id, admission.entry.index


def student_card(store: Store, *, project: str, run: str, version_id: str, decision_index: int) -> dict[str, object]:
    """The run record's ``provenance``: the dataset version, its sign-offs, the training decision and a signed
    checkpoint of the log written now, covering every teacher call behind the rows (``audit trace`` checks it)."""
    return {"project": project, "run": run, "dataset_version": version_id,
            "signoffs": [s.as_dict() for s in signoffs(store, project=project, run=run, version_id=version_id)],
            "train_decision_index": decision_index, "checkpoint": store.checkpoint().as_dict()}


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
