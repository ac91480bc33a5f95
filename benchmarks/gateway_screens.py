"""Prompt screens: precision/recall on the labelled set, false-positive rate on real benign prompts, cost per prompt.

    python benchmarks/gateway_screens.py
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distillgate.gateway.screens import CREDENTIAL_CLASS, EXTRACTION_CLASS, load_screens, run_screens  # noqa: E402


def main() -> None:
    screens = load_screens()
    rows = [json.loads(line) for line in (ROOT / "tests/data/gateway_screens.jsonl").read_text().splitlines() if line]
    print(f"labelled set: {len(rows)} prompts (tests/data/gateway_screens.jsonl)")
    print(f"{'class':32s} {'positives':>9s} {'precision':>9s} {'recall':>7s}")
    for cls in (CREDENTIAL_CLASS, EXTRACTION_CLASS):
        tp = fp = fn = 0
        for row in rows:
            hit = cls in {h.output_class for h in run_screens(screens, row["text"])}
            tp += hit and cls in row["labels"]
            fp += hit and cls not in row["labels"]
            fn += not hit and cls in row["labels"]
        precision = tp / (tp + fp) if tp + fp else 1.0
        print(f"{cls:32s} {tp + fn:9d} {precision:9.3f} {tp / (tp + fn):7.3f}")
    benign = {
        "xstest (450 prompts)": [r["prompt"] for r in csv.DictReader((ROOT / "data/xstest/xstest_prompts.csv").open())],
        "banking77 test": [r["text"] for r in csv.DictReader((ROOT / "data/banking77/test.csv").open())],
    }
    for name, texts in benign.items():
        hits = [t for t in texts if run_screens(screens, t)]
        print(f"false positives on {name}: {len(hits)}/{len(texts)} ({len(hits) / len(texts):.2%})")
    texts = benign["banking77 test"]
    t0 = time.perf_counter()
    for t in texts:
        run_screens(screens, t)
    print(f"cost: {(time.perf_counter() - t0) / len(texts) * 1e6:.1f} µs per prompt (both screens, banking77 lengths)")


if __name__ == "__main__":
    main()
