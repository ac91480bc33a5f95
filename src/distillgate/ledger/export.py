"""Export one run's slice of the decision log, with proof, to ``file://`` or ``s3://``.

Files written under the destination:
  decisions.jsonl    every entry of the run (decisions, settlements, reclaims, reviews, ...), with entry_hash
  decisions.parquet  the same, flattened into typed columns (the full body kept as JSON)
  checkpoint.json    the signed head at export time + an RFC 9162 inclusion proof for every exported entry
  manifest.json      the run's metadata: users, projects, models, policies, counts, tokens, file hashes, public key

A run belongs to one project (the project of its first allowed request, ``Store.run_owner``): the slice is the
entries of that (project, run), judged by that project's policy. Naming another project is refused with
``RUN_OWNED_BY_OTHER_PROJECT``. The destination is judged by the governing policy first
(``DESTINATION_NOT_APPROVED``); the export itself, allowed or denied, is written to the log as an ``export`` event.
The export's signed checkpoint is also a witness of the log (ledger/witness.py): keep ``checkpoint.json`` and
``audit verify --witness`` it later.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from distillgate.canonical import sha256_hex
from distillgate.destinations import join_url, write_files
from distillgate.errors import NotFoundError, PolicyDenied
from distillgate.ledger.merkle import Tree
from distillgate.ledger.store import LogEntry, Store, iso, utc_now
from distillgate.policy.decision import Request
from distillgate.policy.model import PolicySet

_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("index", pa.int64()), ("ts", pa.string()), ("kind", pa.string()), ("user", pa.string()),
    ("project", pa.string()), ("run", pa.string()), ("model", pa.string()), ("output_type", pa.string()),
    ("decision", pa.string()), ("reasons", pa.list_(pa.string())), ("policy_id", pa.string()),
    ("policy_hash", pa.string()), ("tokens_requested", pa.int64()), ("tokens_reserved", pa.int64()),
    ("tokens_charged", pa.int64()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("request_hash", pa.string()), ("response_hash", pa.string()), ("reservation_id", pa.string()),
    ("prev_hash", pa.string()), ("entry_hash", pa.string()), ("body_json", pa.string()),
]


@dataclass(frozen=True)
class ExportResult:
    urls: list[str]
    manifest: dict[str, Any]
    entries: int


def entries_to_parquet(entries: list[LogEntry]) -> bytes:
    data: dict[str, list[Any]] = {name: [] for name, _ in _COLUMNS}
    for e in entries:
        row = e.as_dict()
        for name, _ in _COLUMNS:
            if name == "body_json":
                data[name].append(orjson.dumps(e.body, option=orjson.OPT_SORT_KEYS).decode())
            elif name == "reasons":
                data[name].append([str(r) for r in row.get("reasons") or []])
            else:
                value = row.get(name)
                data[name].append(None if value is None else value)
    table = pa.table({name: pa.array(data[name], type=typ) for name, typ in _COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def run_manifest(run: str, entries: list[LogEntry], files: Mapping[str, bytes], public_key_pem: str,
                 head: dict[str, Any], extra: Mapping[str, Any] | None = None, *,
                 project: str | None = None) -> dict[str, Any]:
    decisions = [e.body for e in entries if e.body.get("kind") == "decision"]
    settlements = [e.body for e in entries if e.body.get("kind") == "settlement"]
    reasons = Counter(r for d in decisions for r in d.get("reasons", []))
    return {
        "manifest_version": 1,
        "run": run,
        "project": project,
        "exported_at": iso(utc_now()),
        "projects": sorted({str(d["project"]) for d in decisions if d.get("project")}),
        "users": sorted({str(d["user"]) for d in decisions if d.get("user")}),
        "models": sorted({str(d["model"]) for d in decisions if d.get("model")}),
        "output_types": sorted({str(d["output_type"]) for d in decisions if d.get("output_type")}),
        "policies": sorted({f"{d['policy_id']}@{d['policy_hash']}" for d in decisions}),
        "entries": len(entries),
        "first_index": entries[0].index if entries else None,
        "last_index": entries[-1].index if entries else None,
        "decisions": {"allow": sum(d["decision"] == "allow" for d in decisions),
                      "deny": sum(d["decision"] == "deny" for d in decisions)},
        "reason_counts": dict(sorted(reasons.items())),
        "tokens_charged": sum(int(s.get("tokens_charged") or 0) for s in settlements),
        "records_charged": sum(int(s.get("records_charged") or 0) for s in settlements),
        "reviewers": sorted({str(e.body["reviewer"]) for e in entries if e.body.get("kind") == "review"
                             and e.body.get("reviewer")}),
        "checkpoint": head,
        "public_key_pem": public_key_pem,
        "files": {name: {"sha256": sha256_hex(data), "bytes": len(data)} for name, data in files.items()},
        **({"metadata": dict(extra)} if extra else {}),
    }


def export_run(store: Store, policies: PolicySet, run: str, to_url: str, *, user: str | None = None,
               project: str | None = None, metadata: Mapping[str, Any] | None = None,
               endpoint_url: str | None = None) -> ExportResult:
    """Export ``run`` (of ``project``, default: the project that owns it) to ``to_url`` if the governing policy
    allows that destination."""
    owner = store.run_owner(run)
    if project is None:
        project = owner
    entries = list(store.entries(run=run, project=project))
    if not entries and owner in (None, project):
        raise NotFoundError(f"no decisions recorded for run {run!r}"
                            + (f" of project {project!r}" if project else ""), hint="check the run id (policy_run_id)")
    policy = policies.select(project)
    request = Request(user=user, project=project, run=run, output_type=None, kind="export", destination=to_url)
    admission = store.admit(policy, request)
    if not admission.decision.allowed:
        hint = f"allowed destinations: {', '.join(policy.destinations()) or 'none'}"
        if "RUN_OWNED_BY_OTHER_PROJECT" in admission.decision.reasons:
            hint = f"run {run!r} is project {owner!r}'s; export it as that project (omit --project)"
        raise PolicyDenied(f"export of run {run!r} to {to_url} denied: {admission.decision.message}",
                           admission.decision.reasons, hint=hint)
    cp = store.checkpoint()
    tree = Tree(store.entry_hashes(cp.tree_size))
    proofs = {str(e.index): tree.inclusion_proof(e.index, cp.tree_size) for e in entries if e.index < cp.tree_size}
    files: dict[str, bytes] = {
        "decisions.jsonl": b"".join(orjson.dumps(e.as_dict(), option=orjson.OPT_SORT_KEYS) + b"\n" for e in entries),
        "decisions.parquet": entries_to_parquet(entries),
        "checkpoint.json": orjson.dumps({"checkpoint": cp.as_dict(), "inclusion_proofs": proofs},
                                        option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2),
    }
    manifest = run_manifest(run, entries, files, store.signer.public_key_pem(), cp.as_dict(),
                            {**(metadata or {}), "export_decision_index": admission.entry.index}, project=project)
    files["manifest.json"] = orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
    urls = write_files(to_url, files, endpoint_url=endpoint_url)
    store.append_event("export", {"run": run, "project": project, "user": user, "destination": to_url,
                                  "files": manifest["files"], "manifest_url": join_url(to_url, "manifest.json")})
    return ExportResult(urls, manifest, len(entries))
