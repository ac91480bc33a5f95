"""The rules synthetic rows live by, checked by the build and again at freeze.

Synthetic rows (``distillgate.data.synthesize``) are training material only: the split code never puts one in val,
test, golden or holdout (``distillgate.data.splits``), and the train split may hold at most
``synthetic.max_train_share`` of them (default 0.5; a guard against a student trained mostly on its teacher's own
inventions). ``synthetic_share`` is the build's count and refusal; ``check_frozen`` is the freeze's, over rows as
stored, so a working copy edited by hand (a synthetic row moved to test) cannot be frozen either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from distillgate.data.schema import SPLITS, Row
from distillgate.errors import DatasetGuardError, SyntheticShareError

#: the only splits a synthetic row may be in
SYNTHETIC_SPLITS = frozenset({"train", "excluded"})


def synthetic_share(split: npt.NDArray[np.int8], synthetic: npt.NDArray[np.bool_], max_share: float) -> dict[str, Any]:
    """Real vs synthetic rows per split (``split`` codes index ``SPLITS``); refuse a train split whose synthetic
    share is above ``max_share`` (``SyntheticShareError``)."""
    by_split: dict[str, dict[str, int]] = {}
    for code, name in enumerate(SPLITS):
        here = split == code
        if here.any():
            n_syn = int((here & synthetic).sum())
            by_split[name] = {"real": int(here.sum()) - n_syn, "synthetic": n_syn}
    train = by_split.get("train", {"real": 0, "synthetic": 0})
    _check_share(train["real"], train["synthetic"], max_share, "the build is refused and nothing was written")
    n_train = train["real"] + train["synthetic"]
    share = train["synthetic"] / n_train if n_train else 0.0
    return {"by_split": by_split, "train_share": round(share, 6), "max_train_share": max_share}


def _check_share(real: int, synthetic: int, max_share: float, what: str) -> None:
    total = real + synthetic
    share = synthetic / total if total else 0.0
    if share > max_share + 1e-12:
        fit = most_synthetic(real, max_share)
        raise SyntheticShareError(
            f"{synthetic} of the {total} train rows ({share:.1%}) are synthetic, more than "
            f"synthetic.max_train_share ({max_share:.0%}); {what}",
            hint=f"with {real} real train rows at most {fit} synthetic ones fit: synthesize fewer (or discard "
            "some with `distillgate dataset synthesize DIR --discard KIND`), add real traffic, or raise "
            "synthetic.max_train_share in the dataset config")


def most_synthetic(real: int, max_share: float) -> int:
    """How many synthetic rows ``real`` real rows can carry at ``max_share``."""
    return int(max_share * real / (1 - max_share)) if max_share < 1 else 2**62


def check_frozen(rows: Sequence[Row], max_share: float) -> None:
    """Refuse to freeze rows whose synthetic ones sit outside train/excluded, or exceed the train share."""
    misplaced = [f"{r.row_id} (split={r.split!r})" for r in rows
                 if r.synthetic is not None and r.split not in SYNTHETIC_SPLITS]
    if misplaced:
        raise DatasetGuardError(
            f"{len(misplaced)} synthetic row(s) are outside the train split: {misplaced[:5]}; synthetic rows never "
            "enter val, test, golden or holdout",
            hint="run `distillgate dataset build DIR` again (it re-splits them); do not move rows by hand")
    train = [r for r in rows if r.split == "train"]
    n_syn = sum(r.synthetic is not None for r in train)
    _check_share(len(train) - n_syn, n_syn, max_share, "the freeze is refused")


def synthetic_counts(rows: Sequence[Row]) -> dict[str, Any]:
    """Real vs synthetic rows per split, synthetic rows per kind and split, the train share, and how often the
    teacher's label (the separate labelling call) is the label the generator was asked to write for."""
    by_split: dict[str, dict[str, int]] = {}
    by_kind: dict[str, dict[str, int]] = {}
    intended = hits = 0
    for r in rows:
        source = "synthetic" if r.synthetic is not None else "real"
        per = by_split.setdefault(r.split or "none", {"real": 0, "synthetic": 0})
        per[source] += 1
        if r.synthetic is not None:
            kind = by_kind.setdefault(str(r.synthetic.get("kind")), {})
            kind[r.split or "none"] = kind.get(r.split or "none", 0) + 1
            if r.synthetic.get("intended_label") and r.split == "train":
                intended += 1
                hits += r.label == r.synthetic["intended_label"]
    train = by_split.get("train", {"real": 0, "synthetic": 0})
    n_train = train["real"] + train["synthetic"]
    return {"by_split": dict(sorted(by_split.items())), "by_kind": dict(sorted(by_kind.items())),
            "train_share": round(train["synthetic"] / n_train, 6) if n_train else 0.0,
            "teacher_label_is_intended": round(hits / intended, 6) if intended else None}
