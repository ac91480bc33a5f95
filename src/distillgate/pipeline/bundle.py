"""Export the run bundle to the project's destination, after the policy approves it.

Files: ``project.yaml`` (resolved), ``dataset/manifest.json``, ``training/run.json``, the promote stage's
``training/promotion-report.json`` (and the signed ``training/promotion.json`` when promoted), ``eval/<suite>/…``
(metrics, report, answers, threshold), ``report.html``, ``metrics.json``, the decision-log slice of the run with a
signed checkpoint and inclusion proofs (``decision-log/``, see docs/audit.md) and ``bundle.json`` listing every file
with its sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from distillgate.canonical import sha256_hex
from distillgate.destinations import join_url, write_files

if TYPE_CHECKING:
    from distillgate.pipeline.run import Pipeline


def bundle_files(pipeline: Pipeline) -> dict[str, bytes]:
    files: dict[str, bytes] = {"project.yaml": yaml.safe_dump(pipeline.doc, sort_keys=False).encode()}
    train = pipeline.require("train")
    version_dir = train.get("version_dir") or pipeline.require("freeze")["version_dir"]
    files["dataset/manifest.json"] = (Path(version_dir) / "manifest.json").read_bytes()
    if Path(train["record"]).exists():
        files["training/run.json"] = Path(train["record"]).read_bytes()
    for name in ("promotion-report.json", "promotion.json"):
        if (Path(train["record"]).parent / name).exists():
            files[f"training/{name}"] = (Path(train["record"]).parent / name).read_bytes()
    eval_dir = pipeline.workdir / "eval"
    for path in sorted(eval_dir.rglob("*")):
        if path.is_file():
            files[f"eval/{path.relative_to(eval_dir).as_posix()}"] = path.read_bytes()
    for name in ("report.html", "metrics.json"):
        if (pipeline.workdir / name).exists():
            files[name] = (pipeline.workdir / name).read_bytes()
    return files


def export_bundle(pipeline: Pipeline, to: str) -> list[str]:
    from distillgate.ledger.export import export_run
    from distillgate.ledger.store import Store

    p = pipeline.project
    train = pipeline.require("train")
    version_id = train.get("version_id") or pipeline.require("freeze")["version_id"]
    gate = pipeline.gate("export", version_id, artifact="bundle", destination=to)
    files = bundle_files(pipeline)
    listing = {name: {"sha256": sha256_hex(data), "bytes": len(data)} for name, data in files.items()}
    urls = write_files(to, files)
    with Store.open(pipeline.store_path) as store:
        result = export_run(store, pipeline.policies, p.run_id, join_url(to, "decision-log/"), user=p.user,
                            project=p.project, metadata={"run_bundle": to, "project": p.name})
    urls += result.urls
    bundle = {"run": p.run_id, "project": p.project, "files": listing, "dataset_version": version_id,
              "signoffs": pipeline.signoffs(version_id), "export_decision_index": gate["decision_index"],
              "decision_log": {"manifest": join_url(to, "decision-log/manifest.json"),
                               "entries": result.entries, "checkpoint": result.manifest.get("checkpoint")}}
    urls += write_files(to, {"bundle.json": json.dumps(bundle, indent=2, sort_keys=True).encode()})
    return urls
