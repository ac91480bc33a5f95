"""Generation throughput through the gateway: banking77 messages → fake teacher, rows/s by concurrency.

    python benchmarks/generate_throughput.py [--inputs 300] [--concurrency 1 8 32]

Each point: a fresh working copy and gateway store, the in-process gateway the CLI starts (uvicorn in a thread,
durable decision log, stamps) in front of the fake OpenAI-compatible teacher (tests/fakes, its own thread), k=1.
Prints rows/s, the per-row cost, and each point's ratio to concurrency 1; writes benchmarks/results/generate.json.
The client, the gateway and the fake teacher share one process and its GIL, so this is a lower bound of what a
separate gateway process gives.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from distillgate.cli.generate_cmd import local_gateway  # noqa: E402
from distillgate.data.config import ColumnMapping, IngestConfig  # noqa: E402
from distillgate.data.generate import PromptTemplate, generate, parse_settings  # noqa: E402
from distillgate.data.ingest import ingest_file  # noqa: E402
from distillgate.data.store import WorkingCopy  # noqa: E402

from fakes.fake_upstream import fake_upstream  # noqa: E402

POLICY = {"policy_id": "bench", "allowed_projects": ["bench"], "allowed_outputs": ["labels"],
          "quotas": {"tokens_per_day": 10_000_000, "records_per_run": 1_000_000, "default_max_tokens": 32},
          "approved_models": ["fake-teacher"]}


def point(tmp: Path, inputs: int, concurrency: int, base_url: str) -> dict[str, float]:
    traffic = tmp / "traffic.csv"
    with (ROOT / "data/banking77/train.csv").open(newline="") as src, traffic.open("w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["text"])
        for i, rec in enumerate(csv.DictReader(src)):
            if i >= inputs:
                break
            w.writerow([rec["text"]])
    (tmp / "policy.json").write_text(json.dumps(POLICY))
    template = PromptTemplate(id="bench", user="Classify this banking message: {input}")
    settings = parse_settings({"model": "fake-teacher", "user": "bench", "project": "bench", "run": "b",
                               "output_type": "labels", "concurrency": concurrency, "max_tokens": 16})
    with WorkingCopy.create(tmp / "ds", {"name": "bench"}) as wc:
        wc.add_inputs(ingest_file(traffic, IngestConfig(columns=ColumnMapping(input="text"))).rows)
        gw = {"policy": str(tmp / "policy.json"), "db": str(tmp / "gw.db"),
              "upstreams": {"fake": {"base_url": base_url}}}
        with local_gateway(gw, "bench") as target:
            started = time.perf_counter()
            report = generate(wc, template, settings, target)
            seconds = time.perf_counter() - started
    assert report.added == inputs and report.failed == 0, report.as_dict()
    return {"concurrency": concurrency, "rows": inputs, "seconds": round(seconds, 3),
            "rows_per_s": round(inputs / seconds, 1), "ms_per_row": round(1000 * seconds / inputs, 2),
            "tokens_per_s": round(report.tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    results = []
    with fake_upstream(reply="card_arrival") as fake:
        for c in args.concurrency:
            with tempfile.TemporaryDirectory() as tmp:
                results.append(point(Path(tmp), args.inputs, c, fake.base_url))
    base = results[0]["rows_per_s"]
    print(f"{'concurrency':>11} {'rows':>6} {'rows/s':>8} {'ms/row':>8} {'tok/s':>8} {'vs first':>9}")
    for r in results:
        print(f"{r['concurrency']:>11} {r['rows']:>6} {r['rows_per_s']:>8} {r['ms_per_row']:>8} "
              f"{r['tokens_per_s']:>8} {r['rows_per_s'] / base:>8.2f}x")
    out = ROOT / "benchmarks/results/generate.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "points": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
