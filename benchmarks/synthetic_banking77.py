"""Student accuracy with vs without synthetic rows, banking77, the offline teacher, CPU.

Two runs of the banking77 demo's study (examples/banking77/project.yaml: the retrieval-augmented SmolLM2-135M teacher
through the in-process gateway, an all-MiniLM-L6-v2 encoder student trained by KD on the teacher's label
distributions), shrunk to ``--rows`` traffic rows:

1. ``without``: generate → build → freeze → train.
2. ``with``: the same working copy after generate (copied), then a ``synthesize`` stage (hard negatives, edge
   cases, out-of-scope, adversarial wording, class balancing; the SmolLM2 teacher writes them through the gateway
   and labels them in separate calls) → build → freeze → train.

The real test split is the same in both (synthetic rows never key a split component; checked). Both students are
scored against the gold banking77 intents on: the real test split, its length slices (``evals.suites.length_bucket``),
and an edge-case slice made of deterministic transforms of the real test rows (misspelt, mixed language, odd
formatting, very short; gold label kept). Differences are item-paired with 95 % bootstrap intervals.

    python benchmarks/synthetic_banking77.py --out /tmp/synth --rows 200

Writes ``OUT/results.json`` (and ``benchmarks/results/synthetic_banking77.json`` with ``--save``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from distillgate.data.synthesize import transform_text
from distillgate.evals.suites import length_bucket
from distillgate.pipeline.project import load_project
from distillgate.pipeline.run import Pipeline

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "banking77"
EDGE = ("misspelt", "mixed_language", "formatting", "short")
SYNTHESIZE: dict[str, Any] = {
    "hard_negatives": 15, "out_of_scope": 5, "adversarial": 8, "balance": {"target": "uniform", "max_new": 20},
    "edge_cases": {"transforms": ["short", "long", "misspelt", "mixed_language", "formatting"], "per_transform": 6,
                   "written": 8},
    "max_tokens": 40, "concurrency": 4,
}


def _abs(path: str) -> str:
    return str((EXAMPLE / path).resolve())


def project_doc(workdir: Path, rows: int, synthesize: dict[str, Any] | None, epochs: int) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLE / "project.yaml").read_text())
    doc["policy"] = _abs(doc["policy"])
    doc["workdir"] = str(workdir)
    doc["run"] = "banking77-synthetic-bench"
    doc["task"]["labels_file"] = _abs(doc["task"]["labels_file"])
    doc["traffic"]["path"] = _abs(doc["traffic"]["path"])
    doc["traffic"]["limit"] = rows
    pool = doc["teacher"]["retrieval"]
    pool["pool"]["path"] = _abs(pool["pool"]["path"])
    pool["k"] = 8  # 0.89 s a call instead of 1.58 s (README): the benchmark compares students, not teachers
    doc["dataset"]["filters"]["allowed_labels_file"] = _abs(doc["dataset"]["filters"]["allowed_labels_file"])
    doc["dataset"]["split"]["ratios"] = {"train": 0.6, "val": 0.05, "test": 0.35}
    doc.pop("compare", None)
    doc["train"]["epochs"] = epochs
    doc["export"] = {"to": None}
    if synthesize is not None:
        doc["synthesize"] = synthesize
    return doc


def pipeline(doc: dict[str, Any], path: Path) -> Pipeline:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    project, resolved, base = load_project(path)
    return Pipeline(project, resolved, base, console=Console(stderr=True), project_file=path)


def run_stages(doc: dict[str, Any], path: Path, stages: list[str]) -> dict[str, float]:
    seconds = {}
    for stage in stages:
        start = time.monotonic()
        outcomes = pipeline(doc, path).run(only=stage)
        seconds[stage] = round(time.monotonic() - start, 1)
        print(f"  {path.stem} {stage}: {outcomes[0].summary} ({seconds[stage]} s)", file=sys.stderr, flush=True)
    return seconds


def student_predict(model_dir: Path, texts: list[str], labels: list[str]) -> list[str]:
    from distillgate.evals.sources import EncoderClassifierSource

    source = EncoderClassifierSource(model_dir, threads=2)
    try:
        out = []
        for text in texts:
            probs, _ = source.score_labels([{"role": "user", "content": text or " "}], labels)
            out.append(labels[int(np.argmax(probs))])
        return out
    finally:
        source.close()


def paired(a: list[bool], b: list[bool], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Accuracy of a and b on the same items, and b - a with a 95 % paired bootstrap interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    diffs = (y[idx] - x[idx]).mean(axis=1)
    return {"n": len(x), "without": round(float(x.mean()), 4), "with": round(float(y.mean()), 4),
            "diff": round(float((y - x).mean()), 4),
            "diff_ci95": [round(float(np.quantile(diffs, 0.025)), 4), round(float(np.quantile(diffs, 0.975)), 4)]}


def test_items(workdir: Path) -> list[Any]:
    head = (workdir / "dataset" / "HEAD").read_text().strip()
    rows = read_parquet(workdir / "dataset" / "versions" / head[:16] / "rows.parquet")
    return sorted((r for r in rows if r.split == "test" and r.filter_status == "pass"), key=lambda r: r.row_id)


def edge_items(test: list[Any]) -> tuple[list[str], list[str], list[str]]:
    texts, gold, kind = [], [], []
    for r in test:
        for name in EDGE:
            texts.append(transform_text(name, r.input, random.Random(f"edge:{name}:{r.row_id}")))
            gold.append(str(r.reference_label))
            kind.append(name)
    return texts, gold, kind


def control(out: Path, rows: int, epochs: int) -> dict[str, Any]:
    """The student without synthetic rows, trained ``epochs`` (about the 'with' student's number of steps), paired
    against the 'with' student on the same items: is a gain the synthetic rows' or only more steps'?"""
    steps_dir = out / "without-steps"
    shutil.rmtree(steps_dir, ignore_errors=True)
    shutil.copytree(out / "without", steps_dir)
    doc = project_doc(steps_dir, rows, None, epochs)
    seconds = run_stages(doc, out / "without-steps.yaml", ["train"])
    labels: list[str] = json.loads(Path(doc["task"]["labels_file"]).read_text())
    test = test_items(steps_dir)
    assert [r.row_id for r in test] == [r.row_id for r in test_items(out / "with")]
    gold = [str(r.reference_label) for r in test]
    e_texts, e_gold, _ = edge_items(test)
    result: dict[str, Any] = {"epochs": epochs, "train_s": seconds["train"]}
    record = json.loads((steps_dir / "train" / "run.json").read_text()) if (steps_dir / "train" / "run.json").exists() \
        else {}
    result["steps"] = record.get("steps")
    ok = {}
    for name, workdir in (("control", steps_dir), ("with", out / "with")):
        pred = student_predict(workdir / "train" / "model", [r.input for r in test], labels)
        edge = student_predict(workdir / "train" / "model", e_texts, labels)
        ok[name] = ([p == g for p, g in zip(pred, gold, strict=True)],
                    [p == g for p, g in zip(edge, e_gold, strict=True)])
    result["real_test_control_vs_with"] = paired(ok["control"][0], ok["with"][0])
    result["edge_control_vs_with"] = paired(ok["control"][1], ok["with"][1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3, help="student epochs (the demo trains 8)")
    parser.add_argument("--keep", action="store_true", help="reuse OUT/without's stored teacher answers")
    parser.add_argument("--control-epochs", type=int, default=5,
                        help="a third student without synthetic rows, trained about as many steps as 'with'")
    parser.add_argument("--control-only", action="store_true",
                        help="only (re)train the control student and add it to OUT/results.json")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/synthetic_banking77.json")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    without, with_ = out / "without", out / "with"
    if args.control_only:
        results = json.loads((out / "results.json").read_text())
        results["control"] = control(out, args.rows, args.control_epochs)
        text = json.dumps(results, indent=2, ensure_ascii=False)
        (out / "results.json").write_text(text + "\n")
        if args.save:
            (ROOT / "benchmarks" / "results" / "synthetic_banking77.json").write_text(text + "\n")
        print(json.dumps(results["control"], indent=2))
        return
    for d in (with_,) if args.keep else (without, with_):
        shutil.rmtree(d, ignore_errors=True)
    doc_without = project_doc(without, args.rows, None, args.epochs)
    doc_with = project_doc(with_, args.rows, SYNTHESIZE, args.epochs)
    timings: dict[str, Any] = {"without": run_stages(doc_without, out / "without.yaml", ["generate"])}
    shutil.copytree(without, with_)  # the same teacher answers for the real rows
    timings["without"].update(run_stages(doc_without, out / "without.yaml", ["build", "freeze", "train"]))
    timings["with"] = run_stages(doc_with, out / "with.yaml",
                                 ["synthesize", "build", "freeze", "train"])

    labels: list[str] = json.loads(Path(doc_with["task"]["labels_file"]).read_text())
    versions = {}
    for name, workdir in (("without", without), ("with", with_)):
        head = (workdir / "dataset" / "HEAD").read_text().strip()
        versions[name] = read_parquet(workdir / "dataset" / "versions" / head[:16] / "rows.parquet")
    tests = {name: sorted((r for r in rows if r.split == "test" and r.filter_status == "pass"),
                          key=lambda r: r.row_id) for name, rows in versions.items()}
    same_test = [r.row_id for r in tests["without"]] == [r.row_id for r in tests["with"]]
    test = tests["without"]
    gold = [str(r.reference_label) for r in test]
    edge_texts, edge_gold, edge_kind = [], [], []
    for r in test:
        for name in EDGE:
            edge_texts.append(transform_text(name, r.input, random.Random(f"edge:{name}:{r.row_id}")))
            edge_gold.append(str(r.reference_label))
            edge_kind.append(name)
    results: dict[str, Any] = {"rows": args.rows, "same_real_test_split": same_test, "test_items": len(test),
                               "edge_items": len(edge_texts)}
    correct: dict[str, dict[str, list[bool]]] = {}
    for name, workdir in (("without", without), ("with", with_)):
        model = workdir / "train" / "model"
        pred = student_predict(model, [r.input for r in test], labels)
        edge_pred = student_predict(model, edge_texts, labels)
        correct[name] = {"test": [p == g for p, g in zip(pred, gold, strict=True)],
                         "edge": [p == g for p, g in zip(edge_pred, edge_gold, strict=True)]}
    results["teacher_test_accuracy"] = round(float(np.mean([r.label == r.reference_label for r in test])), 4)
    results["real_test"] = paired(correct["without"]["test"], correct["with"]["test"])
    buckets = [length_bucket(r.input) for r in test]
    results["real_slices"] = {
        b: paired([c for c, k in zip(correct["without"]["test"], buckets, strict=True) if k == b],
                  [c for c, k in zip(correct["with"]["test"], buckets, strict=True) if k == b])
        for b in sorted(set(buckets))}
    results["edge_slice"] = paired(correct["without"]["edge"], correct["with"]["edge"])
    results["edge_by_transform"] = {
        t: paired([c for c, k in zip(correct["without"]["edge"], edge_kind, strict=True) if k == t],
                  [c for c, k in zip(correct["with"]["edge"], edge_kind, strict=True) if k == t]) for t in EDGE}
    manifest = json.loads((with_ / "dataset" / "versions" / (with_ / "dataset" / "HEAD").read_text().strip()[:16]
                           / "manifest.json").read_text())
    results["with_counts"] = manifest["counts"].get("synthetic")
    results["train_rows"] = {name: sum(r.split == "train" for r in rows) for name, rows in versions.items()}
    written = [r for r in versions["with"] if r.synthetic is not None and r.synthetic.get("transform") is None]
    results["written_examples"] = [{"kind": r.synthetic["kind"], "text": r.input, "teacher_label": r.label,
                                    "intended": r.synthetic.get("intended_label"), "split": r.split,
                                    "filter_reasons": r.filter_reasons}
                                   for r in written[:: max(1, len(written) // 12)]][:12] if written else []
    results["written_filtered"] = {"written": len(written),
                                   "failed_filters": sum(r.filter_status == "fail" for r in written)}
    results["timings_s"] = timings
    results["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    (out / "results.json").write_text(text + "\n")
    if args.save:
        (ROOT / "benchmarks" / "results" / "synthetic_banking77.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
