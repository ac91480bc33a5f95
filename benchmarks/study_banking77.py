"""The banking77 study by parts: teacher strategies, then students by family and recipe, on one CPU budget.

Teacher (SmolLM2-135M-Instruct, label scoring; every strategy on the same ``--eval-rows`` banking77 test rows):

* ``zero_shot``         the 77 labels listed in the system prompt, all 77 scored; no examples (retrieval strategies
                        use one short instruction: the examples show the labels);
* ``knn_vote_k16``      no model: the majority label of the 16 nearest pool examples (all-MiniLM-L6-v2);
* ``retrieval_k8``      the 8 nearest examples as chat turns (farthest first, nearest last), neighbours' labels
                        scored (``teachers/retrieval.py``, the offline default);
* ``retrieval_k16``     the same with 16 examples;
* ``retrieval_k16_all`` 16 examples, all 77 labels scored (what candidate narrowing saves).

The pool is banking77 *train* minus the student's traffic rows (by content hash); eval rows come from *test*.

Retrieval strategies answer a row whose neighbours all carry one label with that label, without running the model
(as ``RetrievalTeacher`` does); ``model_run_share`` is the share of rows where the model ran.

Students (trained on ``--train-rows`` banking77 train rows labelled by ``retrieval_k{--label-k}``; evaluated on the
same eval rows; retention = student accuracy / that strategy's accuracy, both against gold):

* ``encoder_kd``    all-MiniLM-L6-v2 + linear head, end to end, KD on the teacher's label distributions;
* ``encoder_sft``   the same on the teacher's hard labels;
* ``encoder_head_kd`` KD with the encoder frozen (only the head learns);
* ``encoder_kd_random_head`` ``encoder_kd`` with a random linear head instead of label prototypes (``head_init``).

Prints a table, writes ``benchmarks/results/study_banking77.json`` (``--out``). The default is small (a few
minutes on a shared 2-core CPU: 40 eval rows, 200 training rows); the full study:

    python benchmarks/study_banking77.py --eval-rows 400 --train-rows 1000 --threads 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "banking77"
SYSTEM = "You classify each message into exactly one label. Reply with only the label, copied exactly from this " \
         "list: "  # zero-shot: the labels must be listed
SHORT = "You classify each message into exactly one label. Reply with the label only."  # retrieval: the examples
# show the labels (the banking77 project's teacher_system_prompt)


def read(name: str) -> list[dict[str, str]]:
    with (DATA / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.96, k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return mid - half, mid + half


def teacher_strategies(engine: Any, index: Any, rows: Sequence[dict[str, str]], labels: list[str],
                       which: Sequence[str]) -> dict[str, Any]:
    from distillgate.teachers.retrieval import narrow, retrieval_messages

    listed = {"role": "system", "content": SYSTEM + ", ".join(labels)}
    short = {"role": "system", "content": SHORT}
    out: dict[str, Any] = {}
    for name in which:
        hits, seconds, preds, calls = 0, 0.0, [], 0
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            question = {"role": "user", "content": row["text"]}
            if name == "zero_shot":
                calls += 1  # the model scores every row
                probs = engine.score_labels_batch([[listed, question]], labels)[0]
                pred = max(probs, key=probs.__getitem__)
            else:
                k = 8 if name == "retrieval_k8" else 16
                near = [r for r, _ in index.nearest(row["text"], k)]
                if name == "knn_vote_k16":
                    votes = Counter(r.label for r in near)
                    pred = max(votes, key=lambda lab: (votes[lab], -[r.label for r in near].index(lab)))
                else:
                    cands = narrow(labels, near, "all" if name.endswith("_all") else "neighbours")
                    if len(cands) == 1:  # as RetrievalTeacher: one candidate is the answer, the model is not run
                        pred = cands[0]
                    else:
                        calls += 1
                        probs = engine.score_labels_batch([retrieval_messages([short, question], near)], cands)[0]
                        pred = max(probs, key=probs.__getitem__)
            seconds += time.perf_counter() - t0
            hits += pred == row["category"]
            preds.append(pred)
            if (i + 1) % 10 == 0:
                print(f"  {name}: {i + 1}/{len(rows)} acc {hits / (i + 1):.3f} {seconds / (i + 1):.3f} s/row",
                      file=sys.stderr, flush=True)
        lo, hi = wilson(hits, len(rows))
        out[name] = {"accuracy": hits / len(rows), "ci95": [lo, hi], "s_per_item": seconds / len(rows),
                     "n": len(rows), "model_run_share": calls / len(rows) if name != "knn_vote_k16" else 0.0,
                     "predictions": preds}
    return out


def label_rows(engine: Any, index: Any, rows: Sequence[dict[str, str]], labels: list[str],
               k: int = 16) -> list[dict[str, Any]]:
    """Training rows labelled by the retrieval teacher (k neighbours), with its distribution (zeros off the
    candidates; one candidate: probability 1 without running the model, as ``RetrievalTeacher`` does)."""
    from distillgate.teachers.retrieval import narrow, retrieval_messages

    system = {"role": "system", "content": SHORT}
    out = []
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        near = [r for r, _ in index.nearest(row["text"], k)]
        cands = narrow(labels, near, "neighbours")
        probs = {cands[0]: 1.0} if len(cands) == 1 else engine.score_labels_batch(
            [retrieval_messages([system, {"role": "user", "content": row["text"]}], near)], cands)[0]
        full = {lab: float(probs.get(lab, 0.0)) for lab in labels}
        best = max(full, key=full.__getitem__)
        out.append({"row_id": f"train-{i}", "input": row["text"], "label": best, "output": best,
                    "label_probs": full, "split": "train", "filter_status": "pass", "gold": row["category"]})
        if (i + 1) % 25 == 0:
            print(f"  labelling: {i + 1}/{len(rows)} {(time.perf_counter() - t0) / (i + 1):.3f} s/row",
                  file=sys.stderr, flush=True)
    return out


def freeze(rows: list[dict[str, Any]], root: Path) -> Path:
    """A frozen dataset version (working copy at ``root``, HEAD) holding the teacher-labelled training rows."""
    from distillgate.data.schema import FIELD_NAMES, Row, text_sha256
    from distillgate.data.store import WorkingCopy
    from distillgate.data.versions import freeze as freeze_version

    records = []
    for r in rows:
        fields = {k: v for k, v in r.items() if k in FIELD_NAMES}
        fields.update(input_id=str(r["row_id"]), output_raw=r["output"], teacher_label=r["label"],
                      input_sha256=text_sha256(str(r["input"])), reference_label=r["gold"])
        records.append(Row.from_record(fields))
    with WorkingCopy.create(root, {"name": "study_banking77"}) as wc:
        wc.add_inputs(records)
        freeze_version(wc)
    return root


def train_students(rows: list[dict[str, Any]], eval_rows: Sequence[dict[str, str]], labels: list[str],
                   teacher_acc: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from distillgate.evals.sources import EncoderClassifierSource
    from distillgate.train import parse_config, run_recipe

    dataset = freeze(rows, work / "dataset")  # training input is a frozen dataset version, never a free file
    recipes = {"encoder_kd": ("kd", False, "prototypes"), "encoder_sft": ("sft", False, "prototypes"),
               "encoder_head_kd": ("kd", True, "prototypes"), "encoder_kd_random_head": ("kd", False, "random")}
    out: dict[str, Any] = {}
    for name, (recipe, frozen, init) in recipes.items():
        if name not in args.students.split(","):
            continue
        cfg = parse_config({
            "recipe": recipe, "dataset": str(dataset), "output_dir": str(work / name), "labels": labels,
            "student": {"family": "encoder", "encoder": {"freeze_encoder": frozen, "head_init": init}},
            "kd": {"target": "label_probs", "temperature": 2.0, "hard_weight": 0.5},
            "epochs": args.epochs, "batch_size": 16, "lr": 1e-4 if not frozen else 1e-3, "warmup_steps": 10,
            "max_length": 64, "threads": args.threads, "log_every": 50, "resume": False}, name)
        t0 = time.perf_counter()
        result = run_recipe(cfg)
        train_s = time.perf_counter() - t0
        source = EncoderClassifierSource(result.model_dir, threads=args.threads)
        hits, seconds = 0, 0.0
        for row in eval_rows:
            probs, dt = source.score_labels([{"role": "user", "content": row["text"]}], labels)
            seconds += dt
            hits += labels[max(range(len(labels)), key=probs.__getitem__)] == row["category"]
        acc = hits / len(eval_rows)
        lo, hi = wilson(hits, len(eval_rows))
        out[name] = {"family": "encoder_classifier", "recipe": recipe, "frozen_encoder": frozen, "head_init": init,
                     "accuracy": acc, "ci95": [lo, hi],
                     "retention": acc / teacher_acc if teacher_acc > 0 else None,
                     "s_per_item": seconds / len(eval_rows), "train_seconds": train_s, "steps": result.steps}
        print(f"  {name}: accuracy {acc:.3f}, {seconds / len(eval_rows) * 1000:.1f} ms/item, train {train_s:.0f}s",
              file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-rows", type=int, default=40)
    ap.add_argument("--train-rows", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--strategies", default="zero_shot,knn_vote_k16,retrieval_k8,retrieval_k16,retrieval_k16_all")
    ap.add_argument("--label-k", type=int, default=16, help="neighbours of the teacher that labels the training rows")
    ap.add_argument("--students", default="encoder_kd,encoder_sft,encoder_head_kd,encoder_kd_random_head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_banking77.json")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)

    from distillgate.extraction.embed import MiniLMEmbedder
    from distillgate.teachers.loading import cache_root
    from distillgate.teachers.registry import load_local_model
    from distillgate.teachers.retrieval import ExamplePool, PoolIndex, content_hash

    labels = json.loads((DATA / "categories.json").read_text())
    rng = random.Random(args.seed)
    train, test = read("train.csv"), read("test.csv")
    eval_rows = rng.sample(test, args.eval_rows)
    traffic = rng.sample(train, args.train_rows)
    banned = {content_hash(r["text"]) for r in [*traffic, *eval_rows]}
    t0 = time.perf_counter()
    pool = ExamplePool.from_records(train, source="banking77/train", licence="CC-BY-4.0", label_key="category",
                                    exclude=banned)
    pool.assert_disjoint(banned, "traffic and evaluation rows")
    index = PoolIndex(pool, MiniLMEmbedder(threads=args.threads), embedder_id="all-MiniLM-L6-v2",
                      cache_dir=cache_root() / "pools")
    pool_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = load_local_model(dtype=args.dtype, threads=args.threads)
    load_s = time.perf_counter() - t0
    print(f"pool {len(pool.rows)} rows (embedding {pool_s:.0f}s, cached: {index.cache_hit}); teacher load "
          f"{load_s:.0f}s", file=sys.stderr, flush=True)
    teacher = teacher_strategies(engine, index, eval_rows, labels, args.strategies.split(","))
    reference = f"retrieval_k{args.label_k}"  # the teacher that labels the students' rows
    teacher_acc = teacher.get(reference, {}).get("accuracy", 0.0)
    students: dict[str, Any] = {}
    labelling_s = 0.0
    if args.train_rows:
        t0 = time.perf_counter()
        rows = label_rows(engine, index, traffic, labels, k=args.label_k)
        labelling_s = time.perf_counter() - t0
        agreement = sum(r["label"] == r["gold"] for r in rows) / len(rows)
        print(f"  teacher labels on the training rows: {agreement:.3f} accurate", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            students = train_students(rows, eval_rows, labels, teacher_acc, args, Path(tmp))
    for s in students.values():
        t_s = teacher.get(reference, {}).get("s_per_item")
        s["speedup_vs_teacher"] = t_s / s["s_per_item"] if t_s and s["s_per_item"] else None
    result = {
        "benchmark": "study_banking77", "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()},
        "pool_rows": len(pool.rows), "pool_excluded": pool.excluded, "pool_embedding_s": pool_s,
        "teacher_load_s": load_s, "labelling_s": labelling_s,
        "teacher": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in teacher.items()},
        "students": students,
        "wall_s": time.perf_counter() - start, "peak_rss_mb": peak_mb(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'teacher strategy':<20} {'accuracy':>9} {'95% CI':>15} {'s/item':>8} {'model runs':>10}")
    for name, t in result["teacher"].items():
        print(f"{name:<20} {t['accuracy']:>9.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] {t['s_per_item']:>8.3f} "
              f"{t['model_run_share']:>10.2f}")
    if students:
        print(f"\n{'student':<18} {'accuracy':>9} {'retention':>10} {'ms/item':>8} {'speedup':>8} {'train s':>8}")
        for name, s in students.items():
            ret = f"{s['retention']:.3f}" if s["retention"] is not None else "n/a"
            sp = f"{s['speedup_vs_teacher']:.0f}x" if s["speedup_vs_teacher"] else "n/a"
            print(f"{name:<18} {s['accuracy']:>9.3f} {ret:>10} {s['s_per_item'] * 1000:>8.1f} {sp:>8} "
                  f"{s['train_seconds']:>8.0f}")
    print(f"\nwall {result['wall_s']:.0f}s, peak RSS {result['peak_rss_mb']:.0f} MB -> {args.out}")


if __name__ == "__main__":
    main()
