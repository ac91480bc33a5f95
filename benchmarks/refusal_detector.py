"""Refusal detectors against labelled answers: agreement (by kind and refused/not) with Wilson 95 % intervals per
source, the confusion matrix, throughput, and the degenerate-output check.

    python benchmarks/refusal_detector.py [--out benchmarks/results/refusal_detector.json]

Sets (data/refusal/README.md):

* ``uncensorbench`` / ``uncensorbench-partial`` — the held-aside test split of the public source
  (data/refusal/public/test.csv, five topics never used for fitting or choosing anything);
* ``distillgate-heldout`` — the project's own 94 hand-labelled answers (data/refusal/heldout.csv), also never
  used for fitting: a second, smaller and differently made check (real SmolLM2 answers and a context class).

Degenerate output: every labelled answer must pass ``degenerate_reason`` (false positives are counted), and a
set of junk answers of the kinds seen from broken students must all be caught.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distillgate.evals.degenerate import degenerate_reason
from distillgate.evals.refusal import KINDS, REFUSAL_DIR, EmbeddingDetector, StringMatchDetector
from distillgate.evals.refusal_agreement import Agreement, read_labelled_rows, score

ROOT = Path(__file__).resolve().parents[1]

JUNK = [
    "", "   \n ", "_____you_you_you_you_you_you_you_you", "you you you you you you you you you",
    "?!?!?!?!?!?!?!?!?!?!?!", "________________", "... ... ... ... ...", "{}{}{}[][]<<>>//\\\\==++--",
    "Sure, here is how to do it: the the the the the the the the the the the the",
    "I am sorry. I am sorry. I am sorry. I am sorry. I am sorry. I am sorry. I am sorry.",
    "card_arrival card_arrival card_arrival card_arrival card_arrival card_arrival",
    "ab" * 150, "0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x",
]


def line(a: Agreement) -> str:
    return (f"n={a.n:<4} kind {a.accuracy:6.1%} [{a.accuracy_ci[0]:.1%}, {a.accuracy_ci[1]:.1%}]  "
            f"refused {a.refused_agreement:6.1%} [{a.refused_ci[0]:.1%}, {a.refused_ci[1]:.1%}]  "
            f"kappa {a.cohen_kappa:.3f}")


def confusion_lines(a: Agreement) -> list[str]:
    used = [k for k in KINDS if sum(a.confusion[k].values()) or any(a.confusion[g][k] for g in KINDS)]
    out = ["    label \\ detector " + " ".join(f"{k:>10}" for k in used)]
    out += [f"    {g:<19}" + " ".join(f"{a.confusion[g][k]:>10}" for k in used)
            for g in used if sum(a.confusion[g].values())]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refusal_detector.json"))
    args = ap.parse_args()
    test = read_labelled_rows(REFUSAL_DIR / "public" / "test.csv")
    heldout = read_labelled_rows(REFUSAL_DIR / "heldout.csv")
    sets: dict[str, tuple[list[str], list[str]]] = {}
    for src in sorted(set(test.sources)):
        idx = [i for i, s in enumerate(test.sources) if s == src]
        sets[src] = ([test.texts[i] for i in idx], [test.kinds[i] for i in idx])
    sets["distillgate-heldout"] = (heldout.texts, list(heldout.kinds))

    t0 = time.perf_counter()
    emb = EmbeddingDetector()
    load_s = time.perf_counter() - t0
    detectors = {"string": StringMatchDetector(), "embedding": emb}
    preds: dict[str, dict[str, list[str]]] = {name: {} for name in detectors}
    timing: dict[str, float] = {}
    base_sets = [s for s in sets if s != "public test (all)"]
    for name, det in detectors.items():
        t = time.perf_counter()
        for set_name in base_sets:
            preds[name][set_name] = list(det.classify(sets[set_name][0]))
        timing[name] = time.perf_counter() - t
        preds[name]["public test (all)"] = [p for s in base_sets if s.startswith("uncensorbench")
                                            for p in preds[name][s]]
    sets["public test (all)"] = ([t for s in base_sets if s.startswith("uncensorbench") for t in sets[s][0]],
                                 [g for s in base_sets if s.startswith("uncensorbench") for g in sets[s][1]])
    results: dict[str, Any] = {"sets": {}, "load_s": load_s}
    for set_name, (_, gold) in sets.items():
        print(f"\n== {set_name}")
        for name in detectors:
            a = score(name, gold, preds[name][set_name])
            results["sets"].setdefault(set_name, {})[name] = a.as_dict()
            print(f"  {name:<10}{line(a)}")
            for row in confusion_lines(a):
                print(row)
    n_texts = sum(len(sets[s][0]) for s in base_sets)
    results["throughput_answers_per_s"] = {k: n_texts / v for k, v in timing.items()}
    print(f"\nthroughput on {n_texts} answers: " + ", ".join(f"{k} {n_texts / v:,.0f}/s"
                                                           for k, v in timing.items())
          + f"; embedding detector load {load_s:.1f} s")
    false_pos = [t[:80] for t in test.texts + heldout.texts if degenerate_reason(t) is not None]
    caught = [j for j in JUNK if degenerate_reason(j) is not None]
    results["degenerate"] = {"labelled_answers_checked": len(test.texts) + len(heldout.texts),
                             "false_positives": false_pos, "junk": len(JUNK), "junk_caught": len(caught),
                             "junk_as_kind": {"embedding": emb.classify(JUNK),
                                              "string": StringMatchDetector().classify(JUNK)}}
    print(f"degenerate: {len(false_pos)} of {len(test.texts) + len(heldout.texts)} labelled answers flagged "
          f"(false positives); {len(caught)} of {len(JUNK)} junk answers caught")
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
