"""The streaming build's throughput (rows/s) and peak memory: banking77 train (10k rows) and synthetic sets to 10M.

The whole build runs (``process_stream``: normalise, per-row filters, agreement, exact + near duplicates, splits,
leakage check, verdicts written back), with rows generated a batch at a time so that nothing but the build holds
them: peak memory is the build's. Each size runs in its own subprocess so peak RSS (ru_maxrss) is per size; the
baseline is the subprocess's RSS just before the build (interpreter, numpy, pyarrow, the vocabulary), and
``bytes_per_row`` is (peak - baseline) / rows. Prints a table and merges into
benchmarks/results/dataset_throughput.json. Usage:

    python benchmarks/dataset_throughput.py                     # banking77 + synthetic 100k, 1M
    python benchmarks/dataset_throughput.py --sizes 10000000    # one synthetic size (about 10 minutes here)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distillgate.data.config import parse_config  # noqa: E402
from distillgate.data.pipeline import process_stream  # noqa: E402
from distillgate.data.schema import Row  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "dataset_throughput.json"
BATCH = 8192


def _banking() -> list[tuple[str, str]]:
    with (ROOT / "data" / "banking77" / "train.csv").open(newline="") as fh:
        return [(r["text"], r["category"]) for r in csv.DictReader(fh)]


def _answer(label: str) -> str:
    return json.dumps({"type": label, "explanation": "The customer asks about " + label.replace("_", " ") + "."})


def batches(source: str, n: int, base: list[tuple[str, str]], seed: int = 0) -> Iterator[list[Row]]:
    """The same rows on every call, one batch at a time (nothing kept between batches).

    synthetic: banking77 vocabulary, ~5% exact and ~5% near duplicates of an earlier row of the same batch."""
    if source == "banking77":
        for start in range(0, len(base), BATCH):
            yield [Row(row_id=f"b-{i}:0", input_id=f"b-{i}", input=t, output_raw=_answer(lbl))
                   for i, (t, lbl) in enumerate(base[start : start + BATCH], start)]
        return
    vocab = np.array([w for text, _ in base for w in text.split()], dtype=object)
    labels = sorted({lbl for _, lbl in base})
    answers = [_answer(lbl) for lbl in labels]
    for start in range(0, n, BATCH):
        size = min(BATCH, n - start)
        rng = np.random.default_rng([seed, start])
        lengths = rng.integers(6, 25, size=size)
        words = vocab[rng.integers(0, len(vocab), size=int(lengths.sum()))]
        ends = np.cumsum(lengths).tolist()
        texts = [" ".join(words[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        label_of = rng.integers(0, len(labels), size=size).tolist()
        roll = rng.random(size).tolist()
        earlier = (rng.random(size) * np.arange(size)).astype(np.int64).tolist()
        extra = vocab[rng.integers(0, len(vocab), size=size)].tolist()
        for k in range(101, size):
            if roll[k] < 0.05:
                texts[k], label_of[k] = texts[earlier[k]].upper(), label_of[earlier[k]]
            elif roll[k] < 0.10:
                texts[k], label_of[k] = texts[earlier[k]] + " " + extra[k], label_of[earlier[k]]
        yield [Row(row_id=f"s-{i}:0", input_id=f"s-{i}", input=t, output_raw=answers[lbl])
               for i, (t, lbl) in enumerate(zip(texts, label_of, strict=True), start)]


def run_one(source: str, n: int) -> dict[str, object]:
    base = _banking()
    cfg = parse_config({"filters": {"valid_json": True, "allowed_labels_file": str(ROOT / "data" / "banking77" /
                                                                                 "categories.json")}})
    # CPU of generating the rows alone (timed on up to 200k rows), so the build's own rate can be read off
    sample = min(n, 200_000) if n else 0
    g0 = time.process_time()
    sampled = sum(len(b) for b in batches(source, sample, base))
    gen_cpu_per_row = (time.process_time() - g0) / max(1, sampled)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0 = time.process_time()
    t0 = time.perf_counter()
    report = process_stream(lambda: batches(source, n, base), cfg)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    generated = report.filters.rows
    t = report.filters.timings_s
    dedup_cpu = t["sketch_cpu"] + t["exact_dup_cpu"] + t["near_dup_cpu"]
    gen_cpu = gen_cpu_per_row * generated
    build_cpu = cpu - 2 * gen_cpu  # the build reads the rows twice
    return {
        "source": source,
        "rows": generated,
        "passed": report.filters.passed,
        "reasons": report.filters.reasons,
        "clusters": report.filters.clusters,
        "splits": report.split.counts,
        "leakage_hits": len(report.leakage.hits),
        "seconds": {k: round(v, 3) for k, v in report.filters.timings_s.items()},
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "row_generation_cpu_s_per_pass": round(gen_cpu, 1),
        "rows_per_s": round(generated / wall),
        "rows_per_build_cpu_s": round(generated / max(build_cpu, 1e-9)),
        "rows_per_cpu_s_exact_near_dup": round(generated / max(dedup_cpu, 1e-9)),  # sketch + exact + near
        "load_average_1m": round(os.getloadavg()[0], 2),
        "peak_rss_mib": round(peak / 1024),
        "rss_before_build_mib": round(rss_before / 1024),
        "bytes_per_row": round((peak - rss_before) * 1024 / generated),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--no-banking", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "N"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]))))
        return
    runs = []
    todo = [] if args.no_banking else [("banking77", 0)]
    for source, n in [*todo, *[("synthetic", s) for s in args.sizes]]:
        out = subprocess.run([sys.executable, __file__, "--child", source, str(n)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{r['source']:10} {r['rows']:>10,} rows  {r['rows_per_s']:>7,} rows/s wall "
              f"({r['rows_per_build_cpu_s']:,} per build CPU-s, exact+near {r['rows_per_cpu_s_exact_near_dup']:,} "
              f"per CPU-s; load {r['load_average_1m']})  "
              f"peak RSS {r['peak_rss_mib']:>6,} MiB (before build {r['rss_before_build_mib']:,} MiB)  "
              f"{r['bytes_per_row']:>5,} bytes/row", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old_runs = previous.get("runs", [])
    if old_runs and "bytes_per_row" not in old_runs[0]:  # figures of the in-memory build, kept for comparison
        previous["before_streaming"] = [
            {k: r[k] for k in ("source", "rows", "peak_rss_mib", "rss_before_pipeline_mib",
                               "rows_per_s_with_normalise")} for r in old_runs]
        old_runs = []
    fresh = {(r["source"], r["rows"]) for r in runs}
    merged = sorted([*(r for r in old_runs if (r["source"], r["rows"]) not in fresh), *runs],
                    key=lambda r: (r["source"] != "banking77", r["rows"]))
    synthetic = [r for r in merged if r["source"] == "synthetic"]
    if len(synthetic) >= 2:
        a, b = synthetic[0], synthetic[-1]
        growth = (b["peak_rss_mib"] - a["peak_rss_mib"]) * 1024 * 1024 / max(1, b["rows"] - a["rows"])
        print(f"peak RSS growth between {a['rows']:,} and {b['rows']:,} rows: {growth:,.0f} bytes/row")
        previous["growth_bytes_per_row"] = {"from_rows": a["rows"], "to_rows": b["rows"], "bytes": round(growth)}
    RESULTS.write_text(json.dumps({**previous, "machine": {"cpus": os.cpu_count(),
                                                          "python": platform.python_version()},
                                   "runs": merged}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
