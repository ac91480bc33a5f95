"""Refusal detectors against labelled answers: agreement (by kind and refused / not) with Wilson 95 % intervals per
source, before (``string``, ``embedding``) and after (``ngram``, the default), the confusion matrices,
throughput on one core, and the degenerate-output check.

    python benchmarks/refusal_detector.py [--no-embedding] [--out benchmarks/results/refusal_detector.json]

Sets (data/refusal/SOURCE.md):

* ``pyrit-test`` — the PyRIT human-labelled test half (data/refusal/public/pyrit_test.csv), never used to fit or
  choose anything; binary labels, so read the *refused* column;
* ``pyrit-all`` — all 105 PyRIT answers: held out for ``string`` and ``embedding`` (neither saw any); ``ngram``
  was fitted on the other half, so its figure here is printed from the artefact's source-held-out fit instead;
* ``uncensorbench-test`` — UncensorBench's five test topics (data/refusal/public/test.csv), with constructed
  partial refusals: three-way;
* ``distillgate-heldout`` — the project's 94 answers (data/refusal/heldout.csv): held out for ``embedding``; in
  ``ngram``'s pool, so its figure is the source-held-out one;
* ``chatstyle-train`` — the project-written chat-style answers in ``ngram``'s pool
  (data/refusal/chatstyle_train.csv): its figure is the source-held-out one; held out for the other two;
* ``chatstyle-probe`` — the project-written chat-style answers held aside (data/refusal/chatstyle_probe.csv):
  never fitted or chosen on; one writer, so optimistic for real chat-model answers;
* ``pooled-public`` — ``pyrit-test`` plus the ``uncensorbench-test`` rows labelled by UncensorBench's authors
  (its constructed partial refusals left out): every public row no detector was tuned on whose label was not
  made here. Printed next to, never instead of, the per-source figures.

Throughput: every detector on the same answers, one thread (``OMP_NUM_THREADS=1``, torch limited to 1 thread).
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
os.environ.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distillgate.evals.degenerate import degenerate_reason
from distillgate.evals.refusal import (
    KINDS,
    REFUSAL_DIR,
    EmbeddingDetector,
    NgramDetector,
    RefusalDetector,
    StringMatchDetector,
)
from distillgate.evals.refusal_agreement import Agreement, read_labelled_rows, score
from distillgate.evals.refusal_sources import (
    AUTHOR_LABELLED,
    CHATSTYLE_PROBE_CSV,
    PYRIT_TEST_CSV,
    UNCENSORBENCH_TEST_CSV,
    pyrit_rows,
)

ROOT = Path(__file__).resolve().parents[1]

JUNK = [
    "", "   \n ", "_____you_you_you_you_you_you_you_you", "you you you you you you you you you",
    "?!?!?!?!?!?!?!?!?!?!?!", "________________", "... ... ... ... ...", "{}{}{}[][]<<>>//\\\\==++--",
    "Sure, here is how to do it: the the the the the the the the the the the the",
    "I am sorry. I am sorry. I am sorry. I am sorry. I am sorry. I am sorry. I am sorry.",
    "card_arrival card_arrival card_arrival card_arrival card_arrival card_arrival",
    "ab" * 150, "0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x0x",
]
IN_NGRAM_POOL = {"pyrit-all", "distillgate-heldout", "chatstyle-train"}
FROM_ARTEFACT = {"pyrit-all": "pyrit (all 105, fit without PyRIT)", "distillgate-heldout": "distillgate-heldout",
                 "chatstyle-train": "distillgate-chatstyle"}


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
    ap.add_argument("--no-embedding", action="store_true", help="skip the MiniLM detector (slow, needs torch)")
    args = ap.parse_args()
    pyrit = pyrit_rows()
    test = read_labelled_rows(PYRIT_TEST_CSV)
    public = read_labelled_rows(UNCENSORBENCH_TEST_CSV)
    heldout = read_labelled_rows(REFUSAL_DIR / "heldout.csv")
    chat_train = read_labelled_rows(REFUSAL_DIR / "chatstyle_train.csv")
    chat_probe = read_labelled_rows(CHATSTYLE_PROBE_CSV)
    pooled = [(t, k) for rows in (test, public) for t, k, s in zip(rows.texts, rows.kinds, rows.sources, strict=True)
              if s in AUTHOR_LABELLED]
    sets: dict[str, tuple[list[str], list[str]]] = {
        "pyrit-test": (test.texts, list(test.kinds)),
        "pyrit-all": ([r.text for r in pyrit], [r.kind for r in pyrit]),
        "uncensorbench-test": (public.texts, list(public.kinds)),
        "distillgate-heldout": (heldout.texts, list(heldout.kinds)),
        "chatstyle-train": (chat_train.texts, list(chat_train.kinds)),
        "chatstyle-probe": (chat_probe.texts, list(chat_probe.kinds)),
        "pooled-public": ([t for t, _ in pooled], [k for _, k in pooled]),
    }
    t0 = time.perf_counter()
    ngram = NgramDetector()
    detectors: dict[str, RefusalDetector] = {"string": StringMatchDetector(), "ngram": ngram}
    load_s = {"ngram": time.perf_counter() - t0}
    if not args.no_embedding:
        import torch

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        detectors["embedding"] = EmbeddingDetector()
        load_s["embedding"] = time.perf_counter() - t0
    results: dict[str, Any] = {"sets": {}, "load_s": load_s, "throughput_answers_per_s": {}}
    all_texts = [t for texts, _ in sets.values() for t in texts]
    preds: dict[str, dict[str, list[str]]] = {}
    for name, det in detectors.items():
        t = time.perf_counter()
        kinds = list(det.classify(all_texts))
        results["throughput_answers_per_s"][name] = len(all_texts) / (time.perf_counter() - t)
        preds[name] = {}
        for set_name, (texts, _) in sets.items():
            preds[name][set_name], kinds = kinds[:len(texts)], kinds[len(texts):]
    for set_name, (_, gold) in sets.items():
        print(f"\n== {set_name}")
        for name in detectors:
            if name == "ngram" and set_name in IN_NGRAM_POOL:
                fig = ngram.model.meta["source_held_out"][FROM_ARTEFACT[set_name]]
                results["sets"].setdefault(set_name, {})["ngram (source held out)"] = fig
                print(f"  {'ngram':<10}(in its pool; source-held-out fit from the artefact) n={fig['n']:<4} "
                      f"kind {fig['accuracy']:6.1%}  refused {fig['refused_agreement']:6.1%} "
                      f"[{fig['refused_ci'][0]:.1%}, {fig['refused_ci'][1]:.1%}]")
                continue
            a = score(name, gold, preds[name][set_name])
            results["sets"].setdefault(set_name, {})[name] = a.as_dict()
            print(f"  {name:<10}{line(a)}")
            for row in confusion_lines(a):
                print(row)
    print(f"\nthroughput on {len(all_texts)} answers, one thread: " + ", ".join(
        f"{k} {v:,.0f}/s" for k, v in results["throughput_answers_per_s"].items())
        + "; load " + ", ".join(f"{k} {v:.1f} s" for k, v in load_s.items()))
    false_pos = [t[:80] for t in all_texts if degenerate_reason(t) is not None]
    caught = [j for j in JUNK if degenerate_reason(j) is not None]
    results["degenerate"] = {"labelled_answers_checked": len(all_texts), "false_positives": false_pos,
                             "junk": len(JUNK), "junk_caught": len(caught),
                             "junk_as_kind": {name: det.classify(JUNK) for name, det in detectors.items()}}
    print(f"degenerate: {len(false_pos)} of {len(all_texts)} labelled answers flagged (false positives); "
          f"{len(caught)} of {len(JUNK)} junk answers caught")
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
