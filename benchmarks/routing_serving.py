"""Routed traffic vs teacher-only, on the same banking77 test messages, through the real gateway over HTTP.

1. Student: an encoder classifier (all-MiniLM-L6-v2, frozen, with a trained head; `distillgate train`'s encoder
   recipe) on ``--labels`` banking77 intents, ``--train-per-label`` training messages each (gold intents as the
   teacher's labels).
2. Threshold: `route choose`'s rule (target 0.95) on the *choose* half of the test items: messages of the student's
   intents plus as many of other intents (out of its label set: it must learn to hand those to the teacher; the
   teacher is taken to be right on every item).
3. Serving: the other half, sent with the openai SDK to a gateway (uvicorn, loopback) twice: to the routed name and
   to the teacher directly. The teacher is the fake upstream (tests/fakes), optionally answering after
   ``--teacher-ms`` (a stand-in for a real teacher's latency; 0 = the fake as is, which is faster than any model).

Reports: share routed to the student (vs the evaluated coverage), teacher calls and teacher tokens avoided,
latency p50/mean of both passes. Writes ``--out`` (default benchmarks/results/routing_serving.json).

    python benchmarks/routing_serving.py                       # small default, ~1-2 min on 2 cores
    python benchmarks/routing_serving.py --teacher-ms 300 --items 200
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakes.fake_upstream import Behaviour, fake_upstream  # noqa: E402


def read(split: str) -> list[dict[str, str]]:
    with open(ROOT / "data" / "banking77" / f"{split}.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_student(work: Path, rows: list[dict[str, str]], labels: list[str], epochs: int) -> Path:
    from distillgate.data.schema import Row, text_sha256
    from distillgate.data.store import WorkingCopy
    from distillgate.data.versions import freeze
    from distillgate.train import parse_config, run_recipe

    records = [Row(row_id=f"t{i}", input_id=f"t{i}", input=r["text"], output_raw=r["category"], output=r["category"],
                   teacher_label=r["category"], label=r["category"], split="train", filter_status="pass",
                   input_sha256=text_sha256(r["text"])) for i, r in enumerate(rows)]
    with WorkingCopy.create(work / "ds", {"name": "routing-serving"}) as wc:
        wc.add_inputs(records)
        freeze(wc)
    cfg = parse_config({"recipe": "sft", "dataset": str(work / "ds"), "output_dir": str(work / "out"),
                        "labels": labels, "student": {"family": "encoder", "encoder": {"freeze_encoder": True}},
                        "epochs": epochs, "batch_size": 16, "lr": 2e-3, "threads": 2, "log_every": 10_000}, "bench")
    return run_recipe(cfg).model_dir.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                                           lifespan="on", access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(20)


def run_pass(client: Any, model: str, texts: list[str]) -> dict[str, Any]:
    seconds, by_student, teacher_tokens = [], 0, 0
    split: dict[str, list[float]] = {"student": [], "teacher": []}
    for text in texts:
        start = time.perf_counter()
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                max_tokens=8)
        seconds.append(time.perf_counter() - start)
        split["student" if answer.model.startswith("student/") else "teacher"].append(seconds[-1])
        if answer.model.startswith("student/"):
            by_student += 1
        else:
            teacher_tokens += answer.usage.total_tokens if answer.usage else 0
    return {"requests": len(texts), "by_student": by_student, "teacher_calls": len(texts) - by_student,
            "teacher_tokens": teacher_tokens, "p50_ms": 1000 * statistics.median(seconds),
            "mean_ms": 1000 * statistics.fmean(seconds), "total_s": sum(seconds),
            **{f"{k}_mean_ms": 1000 * statistics.fmean(v) for k, v in split.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=5)
    ap.add_argument("--train-per-label", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--items", type=int, default=80, help="test items in all (half choose, half serve)")
    ap.add_argument("--teacher-ms", type=float, default=0.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routing_serving.json"))
    args = ap.parse_args()

    from openai import OpenAI

    from distillgate.evals.routing import RouteThreshold, choose_threshold, coverage_curve, save_threshold
    from distillgate.gateway.config import config_from_data
    from distillgate.gateway.server import build_gateway
    from distillgate.keys import KeyStore
    from distillgate.teachers.student import EncoderStudent

    train, test = read("train"), read("test")
    labels = sorted({r["category"] for r in train})[: args.labels]
    rows = [r for lab in labels for r in [x for x in train if x["category"] == lab][: args.train_per_label]]
    inside = [r for r in test if r["category"] in labels]
    outside = [r for r in test if r["category"] not in labels][:: 7]
    half = args.items // 2
    items = [x for pair in zip(inside[:half], outside[:half], strict=False) for x in pair][: args.items]
    # alternate pairs (one inside, one outside the student's intents) between the two halves
    choose = [x for i, x in enumerate(items) if (i // 2) % 2 == 0]
    serve = [x for i, x in enumerate(items) if (i // 2) % 2 == 1]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        artefact = train_student(work, rows, labels, args.epochs)
        train_s = time.perf_counter() - t0
        student = EncoderStudent("banking", artefact, threads=2)
        verdicts = [student.classify(r["text"]) for r in choose]
        points = coverage_curve([v.confidence for v in verdicts],
                                [v.label == r["category"] for v, r in zip(verdicts, choose, strict=True)],
                                [True] * len(choose))
        best = choose_threshold(points, target=0.95, min_items=5)
        threshold = work / "threshold.json"
        save_threshold(RouteThreshold(threshold=best.threshold, confidence="label_prob", student="student/banking",
                                      teacher="fake-teacher", suite="banking77", target=0.95, min_items=5,
                                      coverage=best.coverage, student_accuracy=best.student_accuracy,
                                      teacher_accuracy=best.teacher_accuracy, system_accuracy=best.system_accuracy,
                                      items=len(choose)), threshold)
        policies = work / "policies"
        policies.mkdir()
        (policies / "p.json").write_text(json.dumps({
            "policy_id": "bench", "allowed_projects": ["bench"], "allowed_outputs": ["labels"],
            "quotas": {"tokens_per_day": 10_000_000, "records_per_run": 1_000_000, "default_max_tokens": 8},
            "approved_models": ["fake-teacher", "banking-intent", "student/banking"]}))
        keys = KeyStore(work / "gw.db")
        key = keys.create("bench")[1]
        keys.close()
        with fake_upstream(reply="teacher-label") as fake:
            gw = build_gateway(config_from_data({
                "policy": str(policies), "db": str(work / "gw.db"),
                "upstreams": {"fake": {"base_url": fake.base_url, "timeout_s": 60}},
                "students": {"banking": str(artefact)},
                "routes": {"banking-intent": {"student": "banking", "teacher": "fake-teacher",
                                              "threshold": str(threshold)}}}))
            with serving(gw) as base_url:
                client = OpenAI(base_url=base_url, api_key=key, max_retries=0, default_headers={
                    "X-Policy-User": "bench", "X-Policy-Project": "bench", "X-Policy-Run": "b1",
                    "X-Policy-Output-Type": "labels"})
                texts = [r["text"] for r in serve]
                run_pass(client, "banking-intent", texts[:3])  # warm-up: the student loads on first use
                if args.teacher_ms > 0:  # each teacher answer waits this long (the passes below; warm-up excluded)
                    fake.push(*[Behaviour.stall(args.teacher_ms / 1000) for _ in range(2 * len(serve))])
                teacher_only = run_pass(client, "fake-teacher", texts)
                routed = run_pass(client, "banking-intent", texts)
            gw.store.close()
            gw.keys.close()
    share = routed["by_student"] / routed["requests"]
    c = best.coverage  # the CI of the difference of two proportions (choose half vs serve half)
    half_width = 1.96 * (c * (1 - c) * (1 / len(choose) + 1 / len(serve))) ** 0.5
    figures = {
        "labels": labels, "train_rows": len(rows), "train_s": round(train_s, 1), "serve_items": len(serve),
        "threshold": best.threshold, "evaluated_coverage": best.coverage, "served_share": share,
        "share_ci_half_width": half_width, "share_within_ci": abs(share - c) <= half_width,
        "teacher_ms_added": args.teacher_ms, "teacher_only": teacher_only, "routed": routed,
        "teacher_calls_saved": 1 - routed["teacher_calls"] / teacher_only["teacher_calls"],
        "teacher_tokens_saved": 1 - routed["teacher_tokens"] / max(1, teacher_only["teacher_tokens"]),
        "latency_ratio_mean": routed["mean_ms"] / teacher_only["mean_ms"],
    }
    print(f"student on {len(labels)} intents, {len(rows)} rows, trained in {train_s:.1f} s; threshold "
          f"{best.threshold:.3f} (evaluated coverage {best.coverage:.2f} ± {half_width:.2f})")
    print(f"served {len(serve)} items: student share {share:.2f}; teacher calls saved "
          f"{figures['teacher_calls_saved']:.0%}, teacher tokens saved {figures['teacher_tokens_saved']:.0%}")
    print(f"latency mean: routed {routed['mean_ms']:.1f} ms vs teacher-only {teacher_only['mean_ms']:.1f} ms "
          f"(ratio {figures['latency_ratio_mean']:.2f}; teacher +{args.teacher_ms:g} ms); routed by route taken: "
          f"student {routed.get('student_mean_ms', 0):.1f} ms, teacher {routed.get('teacher_mean_ms', 0):.1f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
