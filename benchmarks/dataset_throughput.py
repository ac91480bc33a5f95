"""Filter + dedup throughput (rows/s) and peak memory: banking77 train (10k rows) and synthetic sets up to 1M rows.

Each size runs in its own subprocess so peak RSS (ru_maxrss) is per size. Prints a table and writes
benchmarks/results/dataset_throughput.json. Usage:

    python benchmarks/dataset_throughput.py                   # banking77 + synthetic 100k, 300k, 1M
    python benchmarks/dataset_throughput.py --sizes 100000    # one synthetic size
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distillgate.data.config import parse_config  # noqa: E402
from distillgate.data.pipeline import filter_rows, normalise_rows, paused_gc  # noqa: E402
from distillgate.data.schema import Row  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "dataset_throughput.json"


def _banking() -> list[tuple[str, str]]:
    with (ROOT / "data" / "banking77" / "train.csv").open(newline="") as fh:
        return [(r["text"], r["category"]) for r in csv.DictReader(fh)]


def _answer(label: str) -> str:
    return json.dumps({"type": label, "explanation": "The customer asks about " + label.replace("_", " ") + "."})


def make_rows(source: str, n: int, seed: int = 0) -> list[Row]:
    base = _banking()
    if source == "banking77":
        pairs = base
    else:  # synthetic: banking77 vocabulary, ~5% exact and ~5% near duplicates of earlier rows
        rng = random.Random(seed)
        vocab = [w for text, _ in base for w in text.split()]
        labels = sorted({lbl for _, lbl in base})
        pairs = []
        for i in range(n):
            roll = rng.random()
            if i > 100 and roll < 0.05:
                text, label = pairs[rng.randrange(i)]
                text = text.upper()
            elif i > 100 and roll < 0.10:
                text, label = pairs[rng.randrange(i)]
                text = text + " " + rng.choice(vocab)
            else:
                text, label = " ".join(rng.choices(vocab, k=rng.randint(6, 24))), rng.choice(labels)
            pairs.append((text, label))
    return [Row(row_id=f"s-{i}:0", input_id=f"s-{i}", input=t, output_raw=_answer(lbl))
            for i, (t, lbl) in enumerate(pairs[:n] if n else pairs)]


def run_one(source: str, n: int) -> dict[str, object]:
    """Median of 5 runs for sets up to 100k rows (the machine is shared, single runs are noisy); 1 run above."""
    repeats = 5 if (n or 10_003) <= 100_000 else 1
    results = [_run_once(source, n) for _ in range(repeats)]
    results.sort(key=lambda r: r["rows_per_s_exact_near_dup"])  # type: ignore[arg-type,return-value]
    median = results[len(results) // 2]
    median["repeats"] = repeats
    median["exact_near_dup_rows_per_s_range"] = [results[0]["rows_per_s_exact_near_dup"],
                                                  results[-1]["rows_per_s_exact_near_dup"]]
    return median


def _run_once(source: str, n: int) -> dict[str, object]:
    rows = make_rows(source, n)
    cfg = parse_config({"filters": {"valid_json": True, "allowed_labels_file": str(ROOT / "data" / "banking77" /
                                                                                 "categories.json")}})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with paused_gc():
        parsed = normalise_rows(rows, cfg)
    t1 = time.perf_counter()
    report = filter_rows(rows, cfg, parsed=parsed)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = report.timings_s
    dedup_s = t["sketch_and_exact_dup"] + t["near_dup"]
    total = t2 - t0
    return {
        "source": source,
        "rows": len(rows),
        "passed": report.passed,
        "reasons": report.reasons,
        "clusters": report.clusters,
        "seconds": {"normalise": round(t1 - t0, 3), **{k: round(v, 3) for k, v in t.items()},
                    "total": round(total, 3)},
        "rows_per_s_exact_near_dup": round(len(rows) / dedup_s),
        "rows_per_s_filter_and_dedup": round(len(rows) / (t2 - t1)),
        "rows_per_s_with_normalise": round(len(rows) / total),
        "peak_rss_mib": round(peak / 1024),
        "rss_before_pipeline_mib": round(rss_before / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "N"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]))))
        return
    runs = []
    for source, n in [("banking77", 0), *[("synthetic", s) for s in args.sizes]]:
        out = subprocess.run([sys.executable, __file__, "--child", source, str(n)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{r['source']:10} {r['rows']:>9,} rows  exact+near {r['rows_per_s_exact_near_dup']:>9,} rows/s "
              f"(range {r['exact_near_dup_rows_per_s_range'][0]:,}-{r['exact_near_dup_rows_per_s_range'][1]:,}, "
              f"{r['repeats']} run(s))  "
              f"filters+dedup {r['rows_per_s_filter_and_dedup']:>9,} rows/s  with normalise "
              f"{r['rows_per_s_with_normalise']:>9,} rows/s  peak RSS {r['peak_rss_mib']:>6,} MiB "
              f"(rows built: {r['rss_before_pipeline_mib']:,} MiB)", flush=True)
    synthetic = [r for r in runs if r["source"] == "synthetic"]
    if len(synthetic) >= 2:
        a, b = synthetic[0], synthetic[-1]
        growth = (b["peak_rss_mib"] - a["peak_rss_mib"]) / max(1, b["rows"] - a["rows"]) * 1024 * 1024
        print(f"memory growth between {a['rows']:,} and {b['rows']:,} rows: {growth:,.0f} bytes/row; "
              f"throughput ratio (largest/smallest, exact+near): "
              f"{b['rows_per_s_exact_near_dup'] / a['rows_per_s_exact_near_dup']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # merge with earlier runs of other sizes (the 1M run is expensive: run it once, keep its figures)
    previous = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []
    fresh = {(r["source"], r["rows"]) for r in runs}
    merged = sorted([*(r for r in previous if (r["source"], r["rows"]) not in fresh), *runs],
                    key=lambda r: (r["source"] != "banking77", r["rows"]))
    RESULTS.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                   "runs": merged}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
