"""Recipe lift: two students trained on the same rows with different recipes (e.g. kd against sft), compared
item by item on the same suite -- accuracy against gold and agreement with the teacher, with paired bootstrap
intervals of the difference (primary minus baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distillgate.evals.answers import Answer
from distillgate.evals.stats import paired_mean_bootstrap
from distillgate.evals.suites import Suite


def _by_item(answers: Sequence[Answer], role: str) -> dict[str, Answer]:
    return {a.item_id: a for a in answers if a.role == role}


def recipe_lift(suite: Suite, pair_answers: Sequence[Answer], baseline_answers: Sequence[Answer], *,
                primary: str, baseline: str, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``pair_answers`` hold the teacher's and the primary student's answers; ``baseline_answers`` the other
    student's (role ``student``). Items without a gold label count for agreement only."""
    teacher = _by_item(pair_answers, "teacher")
    first = _by_item(pair_answers, "student")
    second = _by_item(baseline_answers, "student")
    items = [it for it in suite.items if it.item_id in first and it.item_id in second]
    out: dict[str, Any] = {"primary": primary, "baseline": baseline, "items": len(items)}
    gold = [it for it in items if it.gold is not None]
    for key, chosen, truth in (("accuracy", gold, lambda it: it.gold),
                               ("agreement", [it for it in items if it.item_id in teacher],
                                lambda it: teacher[it.item_id].label)):
        if not chosen:
            continue
        a = np.array([float(first[it.item_id].label == truth(it)) for it in chosen])
        b = np.array([float(second[it.item_id].label == truth(it)) for it in chosen])
        base_i, prim_i, diff, _ = paired_mean_bootstrap(b, a, resamples=resamples, seed=seed)
        out[key] = {primary: prim_i.as_dict(), baseline: base_i.as_dict(), "lift": diff.as_dict()}
    return out
