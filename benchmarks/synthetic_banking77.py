"""Student accuracy with vs without synthetic rows, banking77, the offline default teacher, CPU.

The banking77 demo's study (examples/banking77/project.yaml: the retrieval-augmented SmolLM2-135M teacher, k = 8
neighbours with the vote prior, through the in-process gateway; an all-MiniLM-L6-v2 encoder student with its head
started at the label prototypes, KD on the teacher's label distributions), shrunk to ``--rows`` traffic rows, three
students from the same teacher answers on the real rows:

1. ``without``: generate → build → freeze → train (``--epochs``).
2. ``with``: the same working copy after generate (copied), then a ``synthesize`` stage (``SYNTHESIZE``: the
   deterministic edge cases of train seeds, and class balancing that the teacher writes through the gateway; with
   ``--written`` also hard negatives, out-of-scope and adversarial wording); the retrieval teacher labels every
   synthetic input in its own governed call → build → freeze → train (``--epochs``).
3. ``control``: ``without``'s frozen version trained for exactly as many optimiser steps as ``with`` (``max_steps``):
   is a difference the synthetic rows' or only more steps'?

The real test split is the same in all three (synthetic rows never key a split component; checked). Students are
scored against the gold banking77 intents on the real test split (and golden rows), its length slices, and the
edge-case probe (``distillgate.evals.edge_probe``: the real test rows under four deterministic transforms, gold
label kept, never a training row); the teacher is scored on the same items (stored answers on the real rows, live
calls through the gateway on the probe). Differences are item-paired with 95 % bootstrap intervals.

    python benchmarks/synthetic_banking77.py --out /tmp/synth --rows 400

Writes ``OUT/results.json`` (and ``benchmarks/results/synthetic_banking77.json`` with ``--save``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import yaml
from rich.console import Console

from distillgate.data.schema import read_parquet
from distillgate.evals.edge_probe import PROBE_TRANSFORMS, probe_items
from distillgate.evals.suites import Item, Suite, length_bucket
from distillgate.pipeline.project import load_project
from distillgate.pipeline.run import Pipeline

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "banking77"
SYNTHESIZE: dict[str, Any] = {
    "edge_cases": {"transforms": ["short", "long", "misspelt", "mixed_language", "formatting"], "per_transform": 24},
    "balance": {"target": "uniform", "max_new": 40},
    "max_tokens": 40, "concurrency": 4,
}
WRITTEN: dict[str, Any] = {"hard_negatives": 15, "out_of_scope": 5, "adversarial": 8}


def _abs(path: str) -> str:
    return str((EXAMPLE / path).resolve())


def project_doc(workdir: Path, rows: int, synthesize: dict[str, Any] | None, epochs: float,
                max_steps: int | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLE / "project.yaml").read_text())
    doc["policy"] = _abs(doc["policy"])
    doc["workdir"] = str(workdir)
    doc["run"] = "banking77-synthetic-bench"
    doc["task"]["labels_file"] = _abs(doc["task"]["labels_file"])
    doc["traffic"]["path"] = _abs(doc["traffic"]["path"])
    doc["traffic"]["limit"] = rows
    doc["teacher"]["retrieval"]["pool"]["path"] = _abs(doc["teacher"]["retrieval"]["pool"]["path"])
    doc["dataset"]["filters"]["allowed_labels_file"] = _abs(doc["dataset"]["filters"]["allowed_labels_file"])
    doc["dataset"]["split"]["ratios"] = {"train": 0.6, "val": 0.05, "test": 0.35}
    doc.pop("compare", None)
    doc["train"]["epochs"] = epochs
    if max_steps is not None:
        doc["train"]["max_steps"] = max_steps
    doc["export"] = {"to": None}
    if synthesize is not None:
        doc["synthesize"] = synthesize
    return doc


def pipeline(doc: dict[str, Any], path: Path) -> Pipeline:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    project, resolved, base = load_project(path)
    return Pipeline(project, resolved, base, console=Console(stderr=True), project_file=path)


def run_stages(doc: dict[str, Any], path: Path, stages: list[str]) -> dict[str, Any]:
    seconds: dict[str, Any] = {}
    for stage in stages:
        start, cpu = time.monotonic(), time.process_time()
        outcomes = pipeline(doc, path).run(only=stage)
        seconds[stage] = {"wall_s": round(time.monotonic() - start, 1),
                          "cpu_s": round(time.process_time() - cpu, 1)}
        print(f"  {path.stem} {stage}: {outcomes[0].summary} ({seconds[stage]})", file=sys.stderr, flush=True)
    return seconds


def version_rows(workdir: Path) -> list[Any]:
    head = (workdir / "dataset" / "HEAD").read_text().strip()
    return read_parquet(workdir / "dataset" / "versions" / head[:16] / "rows.parquet")


def eval_rows(rows: list[Any]) -> list[Any]:
    return sorted((r for r in rows if r.split in ("test", "golden") and r.filter_status == "pass"),
                  key=lambda r: r.row_id)


def student_labels(model_dir: Path, texts: list[str], labels: list[str]) -> list[str | None]:
    from distillgate.evals.answers import run_source
    from distillgate.evals.sources import student_source

    suite = Suite("bench", "classification", [Item(str(i), t or " ", None) for i, t in enumerate(texts)], labels)
    source = student_source(model_dir, name="student", threads=2)
    try:
        return [a.label for a in run_source(suite, source, "student", mode="score")]
    finally:
        source.close()


def teacher_labels(p: Pipeline, texts: list[str]) -> list[str | None]:
    """The teacher through the gateway, asked the way the eval stage asks it (label scoring)."""
    from distillgate.evals.answers import run_source
    from distillgate.evals.sources import OpenAIChatSource

    target = p.gateway()
    pr = p.project
    headers = {"X-Policy-User": pr.user, "X-Policy-Project": pr.project, "X-Policy-Run": pr.run_id,
               "X-Policy-Output-Type": pr.task.output_type}
    suite = Suite("bench", "classification", [Item(str(i), t or " ", None) for i, t in enumerate(texts)], p.labels,
                  system_prompts={"teacher": p.teacher_system})
    teacher = OpenAIChatSource(name=pr.teacher.model, base_url=target.base_url, api_key=target.api_key,
                               headers=headers, request_logprobs=True, label_choices=list(p.labels))
    try:
        return [a.label for a in run_source(suite, teacher, "teacher", mode="generate")]
    finally:
        teacher.close()
        p.close()


def accuracy(ok: list[bool], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    x = np.asarray(ok, dtype=float)
    if not len(x):
        return {"n": 0, "accuracy": None}
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    return {"n": len(x), "accuracy": round(float(x.mean()), 4),
            "ci95": [round(float(np.quantile(means, 0.025)), 4), round(float(np.quantile(means, 0.975)), 4)]}


def paired(a: list[bool], b: list[bool], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """b - a on the same items, with a 95 % paired bootstrap interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(x):
        return {"n": 0}
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    diffs = (y[idx] - x[idx]).mean(axis=1)
    return {"n": len(x), "diff": round(float((y - x).mean()), 4),
            "diff_ci95": [round(float(np.quantile(diffs, 0.025)), 4), round(float(np.quantile(diffs, 0.975)), 4)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=4, help="student epochs (the demo trains 4)")
    parser.add_argument("--written", action="store_true", help="also hard negatives, out-of-scope, adversarial")
    parser.add_argument("--no-teacher-probe", action="store_true", help="do not ask the teacher on the probe")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/synthetic_banking77.json")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    dirs = {name: out / name for name in ("without", "with", "control")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    plan = {**SYNTHESIZE, **(WRITTEN if args.written else {})}
    docs = {"without": project_doc(dirs["without"], args.rows, None, args.epochs),
            "with": project_doc(dirs["with"], args.rows, plan, args.epochs)}
    yamls = {name: out / f"{name}.yaml" for name in dirs}
    timings: dict[str, Any] = {"without": run_stages(docs["without"], yamls["without"], ["generate"])}
    shutil.copytree(dirs["without"], dirs["with"])  # the same teacher answers for the real rows
    timings["without"].update(run_stages(docs["without"], yamls["without"], ["build", "freeze"]))
    shutil.copytree(dirs["without"], dirs["control"])
    timings["without"].update(run_stages(docs["without"], yamls["without"], ["train"]))
    timings["with"] = run_stages(docs["with"], yamls["with"], ["synthesize", "build", "freeze", "train"])
    steps = {name: json.loads((dirs[name] / "stages" / "train.json").read_text())["outputs"]["steps"]
             for name in ("without", "with")}
    docs["control"] = project_doc(dirs["control"], args.rows, None, args.epochs * 10, max_steps=steps["with"])
    timings["control"] = run_stages(docs["control"], yamls["control"], ["train"])
    steps["control"] = json.loads((dirs["control"] / "stages" / "train.json").read_text())["outputs"]["steps"]

    labels: list[str] = json.loads(Path(docs["with"]["task"]["labels_file"]).read_text())
    versions = {name: version_rows(d) for name, d in dirs.items()}
    tests = {name: eval_rows(rows) for name, rows in versions.items()}
    same_test = len({tuple(r.row_id for r in t) for t in tests.values()}) == 1
    test = tests["without"]
    gold = [str(r.reference_label) for r in test]
    train_texts = {r.input for rows in versions.values() for r in rows if r.split == "train"}
    probe, dropped = probe_items([Item(r.row_id, r.input, str(r.reference_label)) for r in test], PROBE_TRANSFORMS,
                                 exclude_texts=train_texts)
    p_gold = [str(it.gold) for it in probe]
    p_kind = [it.slices["transform"] for it in probe]
    results: dict[str, Any] = {"rows": args.rows, "epochs": args.epochs, "synthesize": plan,
                               "same_real_test_split": same_test, "test_items": len(test),
                               "probe_items": len(probe), "probe_dropped": dropped, "steps": steps,
                               "train_rows": {n: sum(r.split == "train" for r in rows)
                                              for n, rows in versions.items()}}
    ok: dict[str, dict[str, list[bool]]] = {}
    for name, d in dirs.items():
        model = d / "train" / "model"
        pred = student_labels(model, [r.input for r in test], labels)
        ppred = student_labels(model, [it.text for it in probe], labels)
        ok[name] = {"test": [p == g for p, g in zip(pred, gold, strict=True)],
                    "probe": [p == g for p, g in zip(ppred, p_gold, strict=True)]}
    ok["teacher"] = {"test": [r.label == r.reference_label for r in test]}
    if not args.no_teacher_probe:
        start = time.monotonic()
        tpred = teacher_labels(pipeline(docs["without"], yamls["without"]), [it.text for it in probe])
        ok["teacher"]["probe"] = [p == g for p, g in zip(tpred, p_gold, strict=True)]
        timings["teacher_probe_s"] = round(time.monotonic() - start, 1)

    def block(select: list[int], key: str) -> dict[str, Any]:
        arms = {name: [ok[name][key][i] for i in select] for name in ok if key in ok[name]}
        res: dict[str, Any] = {name: accuracy(v) for name, v in arms.items()}
        res["with_minus_without"] = paired(arms["without"], arms["with"])
        res["with_minus_control"] = paired(arms["control"], arms["with"])
        return res

    every_test = list(range(len(test)))
    results["real_test"] = block(every_test, "test")
    buckets = [length_bucket(r.input) for r in test]
    results["real_slices"] = {b: block([i for i, k in enumerate(buckets) if k == b], "test")
                              for b in sorted(set(buckets))}
    results["probe"] = block(list(range(len(probe))), "probe")
    results["probe_by_transform"] = {t: block([i for i, k in enumerate(p_kind) if k == t], "probe")
                                     for t in PROBE_TRANSFORMS}
    manifest = json.loads((dirs["with"] / "dataset" / "versions" / (dirs["with"] / "dataset" / "HEAD").read_text()
                           .strip()[:16] / "manifest.json").read_text())
    results["with_counts"] = manifest["counts"].get("synthetic")
    synthetic = [r for r in versions["with"] if r.synthetic is not None]
    written = [r for r in synthetic if r.synthetic.get("transform") is None]
    results["synthetic_rows"] = {
        "inputs": len(synthetic), "trained": sum(r.split == "train" for r in synthetic),
        "failed_filters": sum(r.filter_status == "fail" for r in synthetic),
        "intended_by_kind": {k: accuracy([r.label == r.synthetic.get("intended_label") for r in synthetic
                                          if r.synthetic.get("kind") == k and r.split == "train"
                                          and r.synthetic.get("intended_label")])
                             for k in sorted({str(r.synthetic.get("kind")) for r in synthetic})},
        "intended_by_transform": {t: accuracy([r.label == r.synthetic.get("intended_label") for r in synthetic
                                               if r.synthetic.get("transform") == t and r.split == "train"])
                                  for t in sorted({str(r.synthetic.get("transform")) for r in synthetic
                                                   if r.synthetic.get("transform")})}}
    results["written_examples"] = [{"kind": r.synthetic["kind"], "text": r.input, "teacher_label": r.label,
                                    "intended": r.synthetic.get("intended_label"), "split": r.split}
                                   for r in written[:: max(1, len(written) // 10)]][:10]
    results["timings"] = timings
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    (out / "results.json").write_text(text + "\n")
    if args.save:
        (ROOT / "benchmarks" / "results" / "synthetic_banking77.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
