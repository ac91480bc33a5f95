"""Request-path cost of ExtractionMonitor.observe() and features_record() (no embedder: that work is asynchronous).

    python benchmarks/extraction_observe.py [--requests 5000]

Traffic: banking77 prompts in a generation template from 20 users/keys/runs in 2 projects, warm windows.
Prints per-call latency (p50 / p99 / mean, microseconds) and writes benchmarks/results/extraction_observe.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from distillgate.extraction import ExtractionMonitor, RequestFeatures, features_record

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "Classify this banking customer message into one of the 77 intents. Answer with the label only.\nMessage: {}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extraction_observe.json"))
    args = ap.parse_args()
    with open(ROOT / "data" / "banking77" / "train.csv", newline="", encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    traffic = [RequestFeatures(ts=float(i), user=f"u{i % 20}", key_id=f"k{i % 20}", project=f"p{i % 2}",
                               run=f"r{i % 20}", model="teacher", output_type="labels",
                               prompt=TEMPLATE.format(texts[i % len(texts)]), top_logprobs=5, logprobs=True,
                               max_tokens=8, declared_run_size=10**6)
               for i in range(args.requests)]
    monitor = ExtractionMonitor()
    for f in traffic[:1000]:  # warm the windows
        monitor.observe(f)
    observe, record = [], []
    for f in traffic:
        t = time.perf_counter()
        monitor.observe(f)
        observe.append(time.perf_counter() - t)
        t = time.perf_counter()
        features_record(f)
        record.append(time.perf_counter() - t)

    def stats(xs: list[float]) -> dict[str, float]:
        return {"p50_us": round(1e6 * float(np.percentile(xs, 50)), 1),
                "p99_us": round(1e6 * float(np.percentile(xs, 99)), 1),
                "mean_us": round(1e6 * statistics.fmean(xs), 1)}

    result = {"requests": args.requests, "observe": stats(observe), "features_record": stats(record),
              "cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    print(f"observe():         p50 {result['observe']['p50_us']} us  p99 {result['observe']['p99_us']} us  "
          f"mean {result['observe']['mean_us']} us")
    print(f"features_record(): p50 {result['features_record']['p50_us']} us  p99 "
          f"{result['features_record']['p99_us']} us")
    print(f"(machine load average {result['loadavg_1m']} on {result['cpu_count']} CPUs)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
