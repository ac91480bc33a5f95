"""Routing: send an item to the student when it is confident enough, else to the teacher.

The serving-time rule is one comparison, ``route(confidence, threshold)``. Choosing the threshold is an offline
step on evaluation answers: sweep every distinct student confidence, and for each threshold look at the items
the student would take (confidence >= threshold). The chosen threshold is the lowest one (most traffic to the
student) whose routed items keep the student's accuracy within ``target`` of the teacher's accuracy *on the same
items*, with at least ``min_items`` routed items so that a lucky handful cannot set it.

The threshold travels as a small JSON file (``RouteThreshold``, format ``distillgate.route-threshold/1``) that
``distillgate route apply`` and, later, the gateway read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillgate.errors import ConfigError, ConfigIssue, NotFoundError, UserError

Route = Literal["student", "teacher"]
THRESHOLD_FORMAT: Literal["distillgate.route-threshold/1"] = "distillgate.route-threshold/1"


def route(confidence: float | None, threshold: float) -> Route:
    """``"student"`` when ``confidence >= threshold``; ``"teacher"`` otherwise (also for a missing or NaN one)."""
    if confidence is None or math.isnan(confidence):
        return "teacher"
    return "student" if confidence >= threshold else "teacher"


@dataclass(frozen=True)
class CurvePoint:
    """One threshold of the coverage–accuracy sweep."""

    threshold: float
    coverage: float  # share of items routed to the student
    routed: int  # number of items routed to the student
    student_accuracy: float  # student accuracy on the routed items
    teacher_accuracy: float  # teacher accuracy on the same routed items
    system_accuracy: float  # student on routed + teacher on the rest, over all items

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()}


def coverage_curve(
    confidence: Sequence[float | None], student_correct: Sequence[bool], teacher_correct: Sequence[bool]
) -> list[CurvePoint]:
    """The sweep over every distinct confidence, highest first, ending at coverage 1 (all to the student).

    Items without a confidence are never routed to the student. The first point is the empty route
    (threshold +inf, coverage 0, system accuracy = teacher accuracy).
    """
    n = len(confidence)
    if not (len(student_correct) == len(teacher_correct) == n):
        raise UserError("confidence, student and teacher correctness must cover the same items",
                        hint="pass paired arrays from one evaluation run")
    conf = np.array([math.nan if c is None else float(c) for c in confidence], dtype=np.float64)
    s_ok = np.asarray(student_correct, dtype=np.float64)
    t_ok = np.asarray(teacher_correct, dtype=np.float64)
    teacher_total = float(t_ok.sum())
    points = [CurvePoint(math.inf, 0.0, 0, math.nan, math.nan, teacher_total / n if n else math.nan)]
    known = ~np.isnan(conf)
    for threshold in sorted(set(conf[known].tolist()), reverse=True):
        taken = known & (conf >= threshold)
        k = int(taken.sum())
        s_acc = float(s_ok[taken].mean())
        t_acc = float(t_ok[taken].mean())
        system = (float(s_ok[taken].sum()) + teacher_total - float(t_ok[taken].sum())) / n
        points.append(CurvePoint(float(threshold), k / n, k, s_acc, t_acc, system))
    return points


def choose_threshold(points: Sequence[CurvePoint], *, target: float = 0.95, min_items: int = 10) -> CurvePoint:
    """The point with the most coverage whose student accuracy >= ``target`` x teacher accuracy on its items.

    Returns the empty route (threshold +inf) when no threshold qualifies.
    """
    if not 0 < target <= 1.5:
        raise UserError(f"routing target must be a ratio such as 0.95, got {target}",
                        hint="target=0.95 keeps routed accuracy within 5% of the teacher's")
    best = points[0]
    for point in points[1:]:
        if point.routed < min_items:
            continue
        if point.student_accuracy >= target * point.teacher_accuracy and point.coverage > best.coverage:
            best = point
    return best


class RouteThreshold(BaseModel):
    """The saved routing decision, as read by ``distillgate route apply`` and the gateway."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["distillgate.route-threshold/1"] = THRESHOLD_FORMAT
    threshold: float = Field(description="route to the student when confidence >= threshold; +inf: never")
    confidence: Literal["label_prob", "mean_token_prob"] = Field(
        description="label_prob: probability of the chosen label; mean_token_prob: exp(mean token log-prob)")
    student: str
    teacher: str
    suite: str
    target: float
    min_items: int
    coverage: float = Field(description="share of evaluation items the student took at this threshold")
    student_accuracy: float | None = None
    teacher_accuracy: float | None = None
    system_accuracy: float | None = None
    items: int = Field(description="number of evaluation items the threshold was chosen on")

    def decide(self, confidence: float | None) -> Route:
        return route(confidence, self.threshold)


def save_threshold(threshold: RouteThreshold, path: Path) -> None:
    data: dict[str, Any] = threshold.model_dump()
    if math.isinf(data["threshold"]):
        data["threshold"] = "inf"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_threshold(path: Path) -> RouteThreshold:
    """Read a threshold file; every invalid field is reported at once."""
    if not path.exists():
        raise NotFoundError(f"threshold file {path} does not exist",
                            hint="create one with `distillgate route choose ANSWERS --out FILE`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"not valid JSON: {exc}", "write the file as JSON")]) from exc
    if isinstance(data, dict) and data.get("threshold") == "inf":
        data["threshold"] = math.inf
    try:
        return RouteThreshold.model_validate(data)
    except ValidationError as exc:
        issues = [
            ConfigIssue(".".join(str(p) for p in err["loc"]), err["msg"],
                        "remove the key" if err["type"] == "extra_forbidden" else "see docs/evaluation.md")
            for err in exc.errors()
        ]
        raise ConfigError(str(path), issues) from exc
