"""Real vs synthetic in the run report: what the student learnt from each, and how it holds up on edge cases.

Synthetic rows only ever train (``data.synthetic``), so the report measures them where they are, honestly named:

- **train fit** (``train_fit``): real and synthetic train rows apart (and each synthetic kind), their count and
  share of the train split, and how often the student answers the label the row was trained on
  (``data.guard.training_target``: the teacher's label, or a reviewer's correction). This is agreement on training
  rows, not accuracy on unseen data. Beside it: on real rows, how often the teacher's label is the traffic's gold
  label; on synthetic rows, how often it is the label the row was written for (``synthetic.intended_label``).
- **edge-case probe** (``evals.edge_probe``): the project suite's real held-out items under deterministic
  edge-case transforms, each keeping its row's gold label, answered by teacher and student (``eval/edge_probe/``,
  its own report, retention by transform), next to the real test slice. Probe items are never dataset rows.

Both come with 95 % bootstrap intervals over rows/items.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from distillgate.data.guard import training_target
from distillgate.evals.stats import DEFAULT_RESAMPLES, mean_bootstrap


def mean_ci(values: Sequence[bool], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """The share of true values with a 95 % percentile bootstrap interval (an ``Interval`` dict); None if empty."""
    if not values:
        return None
    return mean_bootstrap(np.asarray(values, dtype=np.float64), resamples=resamples, seed=seed).as_dict()


def train_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows training used: train split, filters passed, one per input, with a target."""
    return [r for r in rows if r.get("split") == "train" and r.get("filter_status", "pass") != "fail"
            and int(r.get("sample_index") or 0) == 0 and training_target(r) is not None]


def pick_rows(rows: Sequence[dict[str, Any]], real_sample: int | None, seed: int) -> list[dict[str, Any]]:
    """Every synthetic train row and a seeded sample of ``real_sample`` real ones (all when None)."""
    train = train_rows(rows)
    real = sorted((r for r in train if r.get("synthetic") is None), key=lambda r: str(r["row_id"]))
    synthetic = sorted((r for r in train if r.get("synthetic") is not None), key=lambda r: str(r["row_id"]))
    if real_sample is not None and real_sample < len(real):
        real = sorted(random.Random(seed).sample(real, real_sample), key=lambda r: str(r["row_id"]))
    return real + synthetic


def _groups(row: dict[str, Any]) -> tuple[str, ...]:
    """The train-fit groups a row counts in: ``real``, or ``synthetic`` and its kind."""
    syn = row.get("synthetic")
    return ("real",) if syn is None else ("synthetic", f"synthetic:{syn.get('kind')}")


def train_fit(rows: Sequence[dict[str, Any]], scored: Sequence[dict[str, Any]], predicted: Sequence[str | None], *,
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The train-fit table from the student's labels ``predicted`` on ``scored`` (``pick_rows`` of ``rows``)."""
    train = train_rows(rows)
    groups: dict[str, list[int]] = {"real": [], "synthetic": []}
    for i, r in enumerate(scored):
        for name in _groups(r):
            groups.setdefault(name, []).append(i)
    totals: dict[str, int] = {"real": 0, "synthetic": 0}
    for r in train:
        for name in _groups(r):
            totals[name] = totals.get(name, 0) + 1
    n_train = len(train)
    out: dict[str, Any] = {}
    for name, idx in groups.items():
        if not totals.get(name):
            continue
        agree = [predicted[i] == training_target(scored[i]) for i in idx]
        entry: dict[str, Any] = {"train_rows": totals[name], "share_of_train": round(totals[name] / n_train, 6),
                                 "scored": len(idx), "student_agrees_with_trained_label":
                                 mean_ci(agree, resamples=resamples, seed=seed)}
        if name == "real":
            gold = [scored[i]["label"] == scored[i]["reference_label"] for i in idx
                    if scored[i].get("reference_label") not in (None, "")]
            entry["teacher_label_is_gold"] = mean_ci(gold, resamples=resamples, seed=seed)
            entry["student_is_gold"] = mean_ci(
                [predicted[i] == scored[i]["reference_label"] for i in idx
                 if scored[i].get("reference_label") not in (None, "")], resamples=resamples, seed=seed)
        else:
            intended = [scored[i]["label"] == scored[i]["synthetic"].get("intended_label") for i in idx
                        if (scored[i].get("synthetic") or {}).get("intended_label")]
            entry["teacher_label_is_intended"] = mean_ci(intended, resamples=resamples, seed=seed)
        out[name] = entry
    return {"what": "student agreement with the label each train row was trained on (train fit, not held-out "
                    "accuracy)", "train_rows": n_train, "groups": out}


def probe_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The probe's ``all`` row and one row per transform, from its suite metrics (``evaluate``)."""
    rows = {}
    for s in metrics.get("retention") or []:
        if s.get("slice") in ("all", "transform"):
            m = (s.get("metrics") or {}).get("accuracy") or {}
            rows["all" if s["slice"] == "all" else str(s["value"])] = {
                "n": s.get("n"), "teacher_accuracy": m.get("teacher"), "student_accuracy": m.get("student"),
                "accuracy_retention": m.get("retention"), "agreement": s.get("agreement")}
    return {"items": metrics.get("items"), "slices": rows,
            "meta": {k: (metrics.get("metadata") or {}).get(k) for k in ("probe_of", "source_items", "transforms",
                                                                          "dropped")}}
