"""Run the quick benchmarks in sequence (`make bench`) and print their headline figures.

    python benchmarks/run_quick.py [--no-litellm] [--seconds 3]

  foundation.py          decide() rate, fsync'd decision-log appends/s (1, 16, 64 writers), verify of 100k entries
  dataset_throughput.py  filters + dedup rows/s and peak memory: banking77 (10k rows) and 100k synthetic rows
  gateway.py             direct vs pass-through vs floor vs distillgate vs LiteLLM's proxy at concurrency 1/16/64

Each writes its JSON under benchmarks/results/ (gateway.json, foundation.json, dataset_throughput.json); this script
adds benchmarks/results/quick.json with the headline figures and the load average. The slow ones run by hand:
``foundation.py --verify-entries 1000000 --out foundation_1m.json`` and ``dataset_throughput.py`` (up to 1M rows).
The machine's load is recorded with every figure: on a shared host the absolute numbers are noisy, ratios less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(script: str, *args: str) -> float:
    print(f"\n=== {script} {' '.join(args)} (load {os.getloadavg()[0]:.1f})", flush=True)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy (it is installed on first use)")
    ap.add_argument("--seconds", default="3", help="seconds per gateway measurement point")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    wall = {
        "foundation": run("foundation.py"),
        "dataset_throughput": run("dataset_throughput.py", "--sizes", "100000"),
    }
    only = ["direct", "passthrough", "floor", "distillgate", "distillgate-after", "distillgate-mp"] + ([] if args.no_litellm else ["litellm"])
    wall["gateway"] = run("gateway.py", "--seconds", args.seconds, "--only", *only)
    foundation = json.loads((RESULTS / "foundation.json").read_text())
    gateway = json.loads((RESULTS / "gateway.json").read_text())
    dataset = json.loads((RESULTS / "dataset_throughput.json").read_text())
    summary = {
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "wall_s": wall,
        "log_appends_per_s": {k: v for k, v in foundation.items() if k.startswith("appends_per_s")},
        "verify_s_per_1M_extrapolated": foundation["verify_s_per_1M_extrapolated"],
        "gateway_rps": {f"{p['target']}@{p['concurrency']}": round(p["rps"]) for p in gateway["points"]},
        "gateway_ratios": gateway["ratios"],
        "dataset_rows_per_s": {f"{r['source']}@{r['rows']}": r["rows_per_s_filter_and_dedup"]
                               for r in dataset["runs"]},
    }
    (RESULTS / "quick.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n=== summary (benchmarks/results/quick.json)")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
