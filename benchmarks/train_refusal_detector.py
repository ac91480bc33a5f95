"""Refit a shipped refusal detector from its source data (data/refusal/SOURCE.md).

    python benchmarks/train_refusal_detector.py                       # the default ``ngram`` detector
    python benchmarks/train_refusal_detector.py --detector embedding  # the MiniLM one (3-8 minutes)

``ngram`` (writes src/distillgate/evals/refusal_ngram_model.json and data/refusal/public/pyrit_test.csv):

* **Pool** (what it is fitted on): PyRIT's human-labelled answers less the test half, UncensorBench's ten
  training topics (refusals, compliant answers, constructed partial refusals and two more constructed variants
  per prompt), data/refusal/train.csv, data/refusal/heldout.csv and data/refusal/chatstyle_train.csv.
* **Test splits, never used to fit or choose anything**: a seeded, label-stratified half of the PyRIT answers
  (``pyrit_test.csv``) and UncensorBench's five test topics (``public/test.csv``); their *pooled* figure counts
  the PyRIT half and UncensorBench's own rows (not the constructed partial refusals). The project-written probe
  ``data/refusal/chatstyle_probe.csv`` is scored the same way and recorded (``probe``); it is never fitted or
  chosen on either.
* **Weights**: real model answers (PyRIT, heldout.csv) count 2, written ones 1, the constructed variants 0.5; kinds
  are balanced.
* **Choices** (regularisation C and the refused threshold tau) by **source-held-out cross-validation** on the
  pool: fit on every source but one, score the one left out; maximise the binary (refused or not) agreement of
  the *worst* held-out source, then the mean over sources (a detector must hold on every kind of answer). The same folds, with the chosen C and tau, give the held-out figures per source
  that the artefact records (``source_held_out``); for PyRIT that fold is fitted with no PyRIT answer at all.

``embedding``: the MiniLM detector of the previous version, refitted the way it was (UncensorBench training
topics + train.csv; C by 5-fold CV grouped by prompt); writes src/distillgate/evals/refusal_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

from distillgate.evals.refusal import (
    ARTEFACT,
    ARTEFACT_FORMAT,
    KINDS,
    NGRAM_ARTEFACT,
    NGRAM_FORMAT,
    REFUSAL_DIR,
    Embedder,
    decide,
)
from distillgate.evals.refusal_agreement import read_labelled_rows, score
from distillgate.evals.refusal_features import STRUCTURAL, features
from distillgate.evals.refusal_ngrams import DENSE, HASH_BITS, PARTS, REST_CHARS, sparse_matrix
from distillgate.evals.refusal_sources import (
    AUTHOR_LABELLED,
    CHATSTYLE_PROBE_CSV,
    PYRIT_FILES,
    PYRIT_TEST_CSV,
    UNCENSORBENCH_SHA256,
    UNCENSORBENCH_TEST_CSV,
    SourceRow,
    partial_variants,
    project_rows,
    pyrit_rows,
    pyrit_split,
    sha256,
    uncensorbench_rows,
    uncensorbench_test_topics,
    write_rows,
)

ROOT = Path(__file__).resolve().parents[1]
C_GRID = (4.0, 16.0, 64.0)
MIN_ROWS = 2
TAU_GRID = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65)
SOURCE_WEIGHT = {"pyrit": 2.0, "distillgate-heldout": 2.0}
VARIANT_WEIGHT = 0.5
FOLDS = ("pyrit", "uncensorbench", "distillgate-train", "distillgate-heldout", "distillgate-chatstyle")


def fold_of(row: SourceRow) -> str:
    return "uncensorbench" if row.source.startswith("uncensorbench") else row.source


def splits() -> tuple[list[tuple[SourceRow, float]], dict[str, list[SourceRow]]]:
    """(pool of (row, weight), test splits by name)."""
    py_train, py_test = pyrit_split(pyrit_rows())
    ub = uncensorbench_rows()
    held = uncensorbench_test_topics(ub)
    ub_train = [r for r in ub if r.topic not in held]
    pool = [(r, SOURCE_WEIGHT.get(r.source, 1.0)) for r in
            py_train + ub_train + project_rows("train") + project_rows("heldout")]
    pool += [(r, VARIANT_WEIGHT) for r in partial_variants(ub_train)]
    pool += [(r, 1.0) for r in project_rows("chatstyle_train")]
    return pool, {"pyrit": py_test, "uncensorbench": [r for r in ub if r.topic in held]}


class Fitted:
    """A fitted sparse logistic regression, its columns compacted to the hashed ids it saw."""

    def __init__(self, x: Any, y: Sequence[str], w: np.ndarray, c: float) -> None:
        from sklearn.linear_model import LogisticRegression

        # hashed ids seen in at least MIN_ROWS training answers, and every dense feature (the last columns)
        seen = np.bincount(x.indices, minlength=x.shape[1])
        seen[x.shape[1] - len(DENSE):] = MIN_ROWS
        self.used = np.flatnonzero(seen >= MIN_ROWS)
        self.clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
        self.clf.fit(x[:, self.used], list(y), sample_weight=w)
        self.classes = [str(k) for k in self.clf.classes_]

    def probabilities(self, x: Any) -> np.ndarray:
        out: np.ndarray = self.clf.predict_proba(x[:, self.used])
        return out


def kinds(classes: Sequence[str], probs: np.ndarray, tau: float) -> list[str]:
    return [decide(dict(zip(classes, map(float, row), strict=True)), tau) for row in probs]


def held_out(pool: list[tuple[SourceRow, float]], x: Any, c: float) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per fold: the classes and probabilities of a model fitted on every other fold."""
    out = {}
    for fold in FOLDS:
        inside = np.array([fold_of(r) != fold for r, _ in pool])
        kept = [(r, w) for (r, w), keep in zip(pool, inside, strict=True) if keep]
        fit = Fitted(x[inside], [r.kind for r, _ in kept], np.array([w for _, w in kept]), c)
        out[fold] = (fit.classes, fit.probabilities(x[~inside]))
    return out


def fold_scores(pool: list[tuple[SourceRow, float]], probs: dict[str, tuple[list[str], np.ndarray]],
                tau: float) -> dict[str, Any]:
    scores = {}
    for fold, (classes, p) in probs.items():
        rows = [r for r, _ in pool if fold_of(r) == fold]
        scores[fold] = score("ngram", [r.kind for r in rows], kinds(classes, p, tau))
    return scores


def figure(a: Any) -> dict[str, Any]:
    return {"n": a.n, "accuracy": a.accuracy, "accuracy_ci": list(a.accuracy_ci),
            "refused_agreement": a.refused_agreement, "refused_ci": list(a.refused_ci)}


def train_ngram() -> None:
    pool, tests = splits()
    write_rows(PYRIT_TEST_CSV, tests["pyrit"])
    t0 = time.perf_counter()
    x = sparse_matrix([r.text for r, _ in pool]).tocsr()
    search: dict[str, dict[str, float]] = {}
    best: tuple[float, float, float, float] = (-1.0, -1.0, 0.0, 0.0)
    best_probs: dict[str, tuple[list[str], np.ndarray]] = {}
    for c in C_GRID:
        probs = held_out(pool, x, c)
        for tau in TAU_GRID:
            agree = [a.refused_agreement for a in fold_scores(pool, probs, tau).values()]
            worst, mean = float(min(agree)), float(np.mean(agree))
            search[f"C={c} tau={tau}"] = {"worst_source": worst, "mean": mean}
            if (worst, mean) > best[:2]:
                best, best_probs = (worst, mean, c, tau), probs
        print(f"  C={c}: best so far: worst held-out source {best[0]:.3f}, mean {best[1]:.3f} "
              f"(C={best[2]}, tau={best[3]})")
    _, _, c, tau = best
    by_fold = {k: figure(a) for k, a in fold_scores(pool, best_probs, tau).items()}
    no_pyrit = [(r, w) for r, w in pool if fold_of(r) != "pyrit"]
    fit_np = Fitted(x[np.array([fold_of(r) != "pyrit" for r, _ in pool])], [r.kind for r, _ in no_pyrit],
                    np.array([w for _, w in no_pyrit]), c)
    every = [r for r, _ in pool if r.source == "pyrit"] + tests["pyrit"]
    p_all = fit_np.probabilities(sparse_matrix([r.text for r in every]).tocsr())
    by_fold["pyrit (all 105, fit without PyRIT)"] = figure(score("ngram", [r.kind for r in every],
                                                                  kinds(fit_np.classes, p_all, tau)))
    fit = Fitted(x, [r.kind for r, _ in pool], np.array([w for _, w in pool]), c)
    test_figures = {}
    predicted: dict[str, list[str]] = {}
    for name, rows in tests.items():
        p = fit.probabilities(sparse_matrix([r.text for r in rows]).tocsr())
        predicted[name] = kinds(fit.classes, p, tau)
        test_figures[name] = figure(score("ngram", [r.kind for r in rows], predicted[name]))
    # pooled: every row whose label is not constructed here (PyRIT's humans, UncensorBench's authors)
    real = [(r.kind, k) for name, rows in tests.items() for r, k in zip(rows, predicted[name], strict=True)
            if r.source in AUTHOR_LABELLED]
    test_figures["pooled"] = figure(score("ngram", [g for g, _ in real], [k for _, k in real]))
    probe = read_labelled_rows(CHATSTYLE_PROBE_CSV)
    p = fit.probabilities(sparse_matrix(probe.texts).tocsr())
    probe_figure = figure(score("ngram", list(probe.kinds), kinds(fit.classes, p, tau)))
    width = len(PARTS) << HASH_BITS
    coef = fit.clf.coef_  # (K, used)
    sparse_cols = fit.used < width
    artefact = {
        "format": NGRAM_FORMAT,
        "classes": fit.classes,
        "hash_bits": HASH_BITS, "parts": list(PARTS), "rest_chars": REST_CHARS, "dense": list(DENSE),
        "c": c, "tau": tau,
        "pool": {"rows": len(pool), "by_source": {s: sum(r.source == s for r, _ in pool)
                                                  for s in sorted({r.source for r, _ in pool})},
                 "by_kind": {k: sum(r.kind == k for r, _ in pool) for k in fit.classes}},
        "sources": {"pyrit": {"package": "pyrit==1.1.0", "licence": "MIT (Microsoft)",
                              "files": {f"pyrit/datasets/scorer_evals/*/{k}": v for k, v in PYRIT_FILES.items()}},
                    "uncensorbench": {"package": "uncensorbench==0.3.7", "licence": "MIT (Wisent AI)",
                                      "sha256": UNCENSORBENCH_SHA256},
                    "distillgate": {name: sha256(REFUSAL_DIR / name) for name in
                                    ("train.csv", "heldout.csv", "chatstyle_train.csv")}},
        "source_held_out": by_fold,
        "test": {"pyrit": {"file": "data/refusal/public/pyrit_test.csv", "sha256": sha256(PYRIT_TEST_CSV),
                           **test_figures["pyrit"]},
                 "uncensorbench": {"file": "data/refusal/public/test.csv", "sha256": sha256(UNCENSORBENCH_TEST_CSV),
                                   **test_figures["uncensorbench"]},
                 "pooled": {"what": "pyrit test half + uncensorbench test rows labelled by the authors "
                                    "(constructed partials left out)", **test_figures["pooled"]}},
        "probe": {"file": "data/refusal/chatstyle_probe.csv", "sha256": sha256(CHATSTYLE_PROBE_CSV),
                  "what": "project-written, held aside: never fitted or chosen on", **probe_figure},
        "search": search,
        "index": [int(v) for v in fit.used[sparse_cols]],
        "coef": [[float(f"{v:.4g}") for v in row[sparse_cols]] for row in coef],
        "dense_coef": [[float(f"{v:.6g}") for v in row[~sparse_cols]] for row in coef],
        "intercept": [float(f"{v:.6g}") for v in fit.clf.intercept_],
    }
    assert len(artefact["dense_coef"][0]) == len(DENSE) and set(fit.classes) <= set(KINDS)
    NGRAM_ARTEFACT.write_text(json.dumps(artefact, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"C={c}, tau={tau}; {len(pool)} pool rows; {time.perf_counter() - t0:.0f} s")
    for fold, f in by_fold.items():
        print(f"  held-out source {fold:<36} n={f['n']:<4} kind {f['accuracy']:.3f}  refused "
              f"{f['refused_agreement']:.3f} [{f['refused_ci'][0]:.3f}, {f['refused_ci'][1]:.3f}]")
    for name, f in [*test_figures.items(), ("chatstyle probe (project-written)", probe_figure)]:
        print(f"  test split {name:<41} n={f['n']:<4} kind {f['accuracy']:.3f}  refused "
              f"{f['refused_agreement']:.3f} [{f['refused_ci'][0]:.3f}, {f['refused_ci'][1]:.3f}]")
    print(f"wrote {NGRAM_ARTEFACT.relative_to(ROOT)} ({NGRAM_ARTEFACT.stat().st_size // 1024} KiB), "
          f"{PYRIT_TEST_CSV.relative_to(ROOT)}")


def train_embedding() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    ub = uncensorbench_rows()
    held = uncensorbench_test_topics(ub)
    ub_train = [r for r in ub if r.topic not in held]
    train = ub_train + partial_variants(ub_train) + project_rows("train")
    x = features([r.text for r in train], Embedder())
    y = [r.kind for r in train]
    cv = {}
    for c in (0.25, 1.0, 4.0, 16.0):
        hits = 0
        for tr, va in GroupKFold(n_splits=5).split(x, y, [r.group for r in train]):
            clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x[tr], [y[i] for i in tr])
            hits += int(np.sum(clf.predict(x[va]) == np.array([y[i] for i in va])))
        cv[str(c)] = hits / len(y)
    c = max((0.25, 1.0, 4.0, 16.0), key=lambda v: (cv[str(v)], -v))
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x, y)
    test = [r for r in ub if r.topic in held]
    result = score("embedding", [r.kind for r in test], [str(p) for p in clf.predict(
        features([r.text for r in test], Embedder()))])
    old = json.loads(ARTEFACT.read_text(encoding="utf-8"))
    old.update({"format": ARTEFACT_FORMAT, "classes": [str(k) for k in clf.classes_], "structural": list(STRUCTURAL),
                "c": c, "cv_accuracy": cv, "coef": [[float(f"{v:.6g}") for v in row] for row in clf.coef_],
                "intercept": [float(f"{v:.6g}") for v in clf.intercept_]})
    old["test"].update({"accuracy": result.accuracy, "refused_agreement": result.refused_agreement})
    ARTEFACT.write_text(json.dumps(old, indent=1) + "\n", encoding="utf-8")
    print(f"C={c}; test 3-way {result.accuracy:.3f}, binary {result.refused_agreement:.3f}; wrote {ARTEFACT}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--detector", choices=("ngram", "embedding"), default="ngram")
    args = ap.parse_args()
    train_ngram() if args.detector == "ngram" else train_embedding()


if __name__ == "__main__":
    main()
