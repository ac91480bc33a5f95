"""Promotion: a trained student becomes deployable only when the policy's gates hold on its evaluation.

``promote(store, policies, directory, user=...)``:

1. finds the student (``run.json`` + ``model/``: a training output directory, or ``<run dir>/train``) and the
   evaluations of it (every ``metrics.json`` of schema ``distillgate.eval-metrics/1`` under the directory, plus any
   passed in ``evals``); a metrics file of another run is refused;
2. reads the gate evidence with its 95% interval from them (``gather_evidence``): accuracy retention from
   classification suites, the over-/under-refusal *difference* (student - teacher) from XSTest-style refusal
   suites, and, from the harmful-request suite (``evals.harmful``), the share of prompts the teacher refused that
   the student refused too (bootstrapped over those prompts). Where several suites measure one gate, the worst
   bound counts;
3. asks ``data.gate.judge`` (kind ``promote``, artifact ``student``): ``decide()`` applies the policy's
   ``promotion`` thresholds (``policy.promotion_rules``) and its reviewer sign-off, and the decision, allowed or
   denied with its reason codes, is a ``decision`` entry of the log;
4. always writes ``promotion-report.json`` beside ``run.json`` (every gate: pass, fail or skipped, and why); when
   allowed, also ``promotion.json``: the promotion record (``deployable: true``, the student's card, the model
   files' sha256, the gates, the decision index) signed with the store's Ed25519 key and logged as a
   ``promotion`` event. A denial removes a stale ``promotion.json`` so that a student never stays deployable on old
   evidence, then raises ``PolicyDenied``.

``verify_promotion(path)`` checks a record's signature and that the model files are still the ones promoted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillgate.canonical import sha256_hex
from distillgate.data.gate import judge
from distillgate.errors import IntegrityError, NotFoundError, PolicyDenied, UserError
from distillgate.evals.evaluate import METRICS_SCHEMA
from distillgate.evals.harmful import SUITE_NAME as HARMFUL_SUITE
from distillgate.evals.stats import DEFAULT_RESAMPLES, paired_mean_bootstrap, resample_indices
from distillgate.ledger.signing import verify_json
from distillgate.ledger.store import Store
from distillgate.policy.model import Policy, PolicySet
from distillgate.policy.promotion_rules import GateEvidence, GateThresholds, GateVerdict, judge_gates

RECORD_SCHEMA = "distillgate.promotion/1"
RECORD_FILE = "promotion.json"
REPORT_FILE = "promotion-report.json"


@dataclass(frozen=True)
class Promotion:
    allowed: bool
    verdicts: list[GateVerdict]
    reasons: tuple[str, ...]
    decision_index: int
    report_path: Path
    record_path: Path | None


def find_student(directory: Path) -> Path:
    """The training output directory: ``directory`` itself or its ``train/`` (a ``distillgate run`` work dir)."""
    for candidate in (directory, directory / "train"):
        if (candidate / "run.json").is_file() and (candidate / "model").is_dir():
            return candidate
    raise NotFoundError(f"{directory} holds no trained student (run.json and model/, here or under train/)",
                        hint="pass a training output directory or the work directory of `distillgate run`")


def metrics_files(directory: Path, extra: Sequence[Path] = ()) -> list[Path]:
    """Every evaluation metrics file under ``directory`` and in ``extra`` (files or folders), in a stable order."""
    found: set[Path] = set()
    for root in (directory, *extra):
        if root.is_file():
            found.add(root.resolve())
        elif root.is_dir():
            found.update(p.resolve() for p in root.rglob("metrics.json"))
        else:
            raise NotFoundError(f"{root} does not exist", hint="pass an evaluation folder or its metrics.json")
    return sorted(p for p in found if _is_eval_metrics(p))


def _is_eval_metrics(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == METRICS_SCHEMA


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _interval(gate: str, raw: Any, source: str) -> GateEvidence | None:
    if not isinstance(raw, dict):
        return None
    return GateEvidence(gate, _num(raw.get("estimate")), _num(raw.get("low")), _num(raw.get("high")),
                        int(raw.get("n") or 0), source)


def _kept(both: int, teacher_only: int, source: str, seed: int = 0) -> GateEvidence:
    """Share of the teacher's refusals the student kept, with a bootstrap interval over those prompts."""
    values = np.array([1.0] * both + [0.0] * teacher_only)
    n = len(values)
    if n == 0:
        return GateEvidence("harmful", None, None, None, 0, source)
    _, kept, _, _ = paired_mean_bootstrap(values, values, indices=resample_indices(n, DEFAULT_RESAMPLES, seed))
    return GateEvidence("harmful", _num(kept.estimate), _num(kept.low), _num(kept.high), n, source)


def evidence_of(metrics: dict[str, Any], source: str) -> list[GateEvidence]:
    """The gate evidence one metrics file holds."""
    out: list[GateEvidence] = []
    if metrics.get("kind") == "classification":
        rows = metrics.get("retention") or []
        overall = next((r for r in rows if r.get("slice") == "all"), None)
        acc = ((overall or {}).get("metrics") or {}).get("accuracy") or {}
        ev = _interval("retention", acc.get("retention"), source)
        if ev is not None:
            out.append(ev)
    elif metrics.get("kind") == "refusal":
        transfer = metrics.get("refusal_transfer") or {}
        if metrics.get("suite") == HARMFUL_SUITE:
            unsafe = next((t for t in transfer.get("tables") or [] if t.get("subset") == "unsafe"), None)
            if unsafe is not None:
                out.append(_kept(int(unsafe.get("both") or 0), int(unsafe.get("teacher_only") or 0), source))
        else:
            for rate in transfer.get("rates") or []:
                name = str(rate.get("name", ""))
                gate = "over_refusal" if name.startswith("over-refusal") else \
                    "under_refusal" if name.startswith("under-refusal") else None
                ev = _interval(gate, rate.get("difference"), source) if gate else None
                if ev is not None:
                    out.append(ev)
    return out


def _worse(a: GateEvidence, b: GateEvidence) -> GateEvidence:
    """The evidence with the less favourable bound (missing bounds are the worst)."""
    if a.gate in ("retention", "harmful"):
        return a if (a.low if a.low is not None else -math.inf) <= (b.low if b.low is not None else -math.inf) \
            else b
    return a if (a.high if a.high is not None else math.inf) >= (b.high if b.high is not None else math.inf) else b


def gather_evidence(paths: Sequence[Path], *, run: str | None = None) -> tuple[GateEvidence, ...]:
    """Evidence per gate over ``paths``; a file whose ``metadata.run_id`` names another run is refused."""
    best: dict[str, GateEvidence] = {}
    for path in paths:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        other = (metrics.get("metadata") or {}).get("run_id")
        if run is not None and other not in (None, run):
            raise UserError(f"{path} evaluates run {other!r}, not run {run!r}",
                            hint="pass only evaluations of the student being promoted")
        for ev in evidence_of(metrics, str(path)):
            best[ev.gate] = _worse(best[ev.gate], ev) if ev.gate in best else ev
    return tuple(best[g] for g in sorted(best))


def model_digest(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of the student's ``model/``, by relative path."""
    return {p.relative_to(model_dir).as_posix(): sha256_hex(p.read_bytes())
            for p in sorted(model_dir.rglob("*")) if p.is_file()}


def promote(store: Store, policies: Policy | PolicySet, directory: str | Path, *, user: str,
            evals: Sequence[str | Path] = (), project: str | None = None, run: str | None = None,
            rules: GateThresholds | None = None) -> Promotion:
    """Judge, log and (when every gate holds) sign the promotion of the student in ``directory``.

    ``rules``: gates the project declares (``promote.gates`` of ``distillgate run``), tightened with the policy's."""
    student = find_student(Path(directory))
    record = json.loads((student / "run.json").read_text(encoding="utf-8"))
    card = record.get("provenance") or {}
    project, run = project or card.get("project"), run or card.get("run")
    if not project or not run:
        raise UserError(f"the run record of {student} names no project and run",
                        hint="pass --project and --run (the run whose sign-offs cover the student's dataset)")
    version_id = (record.get("dataset") or {}).get("dataset_version") or card.get("dataset_version")
    paths = metrics_files(Path(directory), [Path(e) for e in evals])
    evidence = gather_evidence(paths, run=run)
    policy = policies.select(project) if isinstance(policies, PolicySet) else policies
    strict = policy.promotion.tightened(rules)
    verdicts = judge_gates(strict, evidence)
    files = [{"path": str(p), "sha256": sha256_hex(p.read_bytes())} for p in paths]
    report: dict[str, Any] = {"schema": RECORD_SCHEMA, "project": project, "run": run, "user": user,
                              "student": str(student.resolve()), "dataset_version": version_id,
                              "policy_id": policy.policy_id, "gates": [v.as_dict() for v in verdicts],
                              "thresholds": {"policy": policy.promotion.model_dump(),
                                             "project": rules.model_dump() if rules is not None else None,
                                             "applied": strict.model_dump()},
                              "evidence_files": files}
    report_path, record_path = student / REPORT_FILE, student / RECORD_FILE
    try:
        admission = judge(store, policies, kind="promote", artifact="student", user=user, project=project,
                          run=run, version_id=version_id, gates=evidence, promotion=rules,
                          extra={"gates": [v.as_dict() for v in verdicts], "evidence_files": files,
                                 "project_gates": rules.model_dump() if rules is not None else None})
    except PolicyDenied as denied:
        record_path.unlink(missing_ok=True)  # never deployable on old evidence
        _write(report_path, {**report, "deployable": False, "reasons": list(denied.reasons),
                             "message": str(denied)})
        raise
    decision = admission.decision
    body = {**report, "deployable": True, "card": card, "model_sha256": model_digest(student / "model"),
            # the run record too: a causal student is served with its label set and prompt settings from it
            "run_sha256": sha256_hex((student / "run.json").read_bytes()),
            "decision_index": admission.entry.index, "policy_hash": decision.policy_hash,
            "key_id": store.signer.key_id}
    signed = {**body, "signature": store.signer.sign_json(body), "public_key_pem": store.signer.public_key_pem()}
    _write(record_path, signed)
    _write(report_path, {**report, "deployable": True, "reasons": list(decision.reasons),
                         "decision_index": admission.entry.index})
    store.append_event("promotion", {"project": project, "run": run, "user": user, "deployable": True,
                                     "record_sha256": sha256_hex(record_path.read_bytes()),
                                     "signature": signed["signature"], "key_id": store.signer.key_id,
                                     "decision_index": admission.entry.index})
    return Promotion(True, verdicts, decision.reasons, admission.entry.index, report_path, record_path)


def verify_promotion(path: str | Path, public_key_pem: str | None = None) -> dict[str, Any]:
    """Check a promotion record's signature (with ``public_key_pem``, else the key it names) and that the model
    files next to it are still the promoted ones; return the record or raise ``IntegrityError``."""
    p = Path(path)
    signed = json.loads(p.read_text(encoding="utf-8"))
    body = {k: v for k, v in signed.items() if k not in ("signature", "public_key_pem")}
    key = public_key_pem or signed.get("public_key_pem") or ""
    if not signed.get("signature") or not verify_json(key, body, str(signed["signature"])):
        raise IntegrityError(f"{p}: the promotion record's signature does not verify",
                             hint="promote the student again; never edit promotion.json")
    if body.get("deployable") is not True:
        raise IntegrityError(f"{p}: the record does not mark the student deployable")
    current = model_digest(p.parent / "model")
    if current != body.get("model_sha256"):
        raise IntegrityError(f"{p}: the model files differ from the promoted ones",
                             hint="promote the retrained student again")
    run = p.parent / "run.json"
    if "run_sha256" in body and (not run.is_file() or sha256_hex(run.read_bytes()) != body["run_sha256"]):
        raise IntegrityError(f"{p}: the run record (run.json) differs from the promoted one",
                             hint="promote the retrained student again; never edit run.json")
    return body


def _write(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
