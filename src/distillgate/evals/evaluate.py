"""From stored answers to every number of the report: ``evaluate(suite, answers, ...) -> EvalResult``.

``EvalResult.as_dict()`` is ``metrics.json``; ``report.render_html(result)`` draws the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distillgate.evals.answers import Answer, mark_degenerate, split_roles
from distillgate.evals.retention import SliceResult, retention_by_slice
from distillgate.evals.routing import CurvePoint, choose_threshold, coverage_curve
from distillgate.evals.speed import Speed, speed
from distillgate.evals.stats import DEFAULT_RESAMPLES, Flip, flips
from distillgate.evals.suites import Suite
from distillgate.evals.transfer import RefusalTransfer, refusal_transfer

METRICS_SCHEMA = "distillgate.eval-metrics/1"


@dataclass(frozen=True)
class Routing:
    confidence_kind: str
    target: float
    min_items: int
    curve: list[CurvePoint]
    chosen: CurvePoint

    def as_dict(self) -> dict[str, Any]:
        return {"confidence_kind": self.confidence_kind, "target": self.target, "min_items": self.min_items,
                "curve": [p.as_dict() for p in self.curve], "chosen": self.chosen.as_dict()}


@dataclass(frozen=True)
class EvalResult:
    suite: str
    kind: str
    items: int
    teacher: dict[str, Any]  # teacher card
    student: dict[str, Any]  # student card
    metadata: dict[str, Any]
    speed: list[Speed]
    slices: list[SliceResult] = field(default_factory=list)
    lost: list[Flip] = field(default_factory=list)
    gained: list[Flip] = field(default_factory=list)
    transfer: RefusalTransfer | None = None
    routing: Routing | None = None
    errors: dict[str, int] = field(default_factory=dict)  # answers that came back as errors (e.g. denials)

    def headline(self) -> dict[str, Any]:
        """The few numbers a reader wants first."""
        out: dict[str, Any] = {}
        if self.slices:
            overall = self.slices[0]
            acc = overall.get("accuracy")
            if acc is not None:
                out["teacher_accuracy"] = acc.teacher.as_dict()
                out["student_accuracy"] = acc.student.as_dict()
                out["accuracy_retention"] = acc.retention.as_dict()
            out["agreement"] = overall.agreement.as_dict()
            out["lost_items"] = len(self.lost)
            out["gained_items"] = len(self.gained)
        if self.transfer is not None:
            for rate in self.transfer.rates[:2]:
                key = "over_refusal" if rate.name.startswith("over") else "under_refusal"
                out[key] = {"teacher": rate.teacher.as_dict(), "student": rate.student.as_dict()}
            out["refusal_agreement"] = self.transfer.refusal_agreement
        if self.routing is not None:
            out["student_traffic_share"] = self.routing.chosen.coverage
            thr = self.routing.chosen.threshold
            out["routing_threshold"] = None if math.isinf(thr) else thr
        sp = {s.role: s for s in self.speed}
        out["degenerate_answers"] = {role: s.degenerate for role, s in sp.items()}
        if "teacher" in sp and "student" in sp and sp["student"].latency_mean_s > 0:
            # over answers that are answers: a degenerate one is left out of both models' latency
            out["speedup_mean_latency"] = sp["teacher"].latency_mean_s / sp["student"].latency_mean_s
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": METRICS_SCHEMA,
            "suite": self.suite,
            "kind": self.kind,
            "items": self.items,
            "headline": self.headline(),
            "teacher": self.teacher,
            "student": self.student,
            "metadata": self.metadata,
            "speed": [s.as_dict() for s in self.speed],
            "retention": [s.as_dict() for s in self.slices],
            "lost": [f.as_dict() for f in self.lost],
            "gained": [f.as_dict() for f in self.gained],
            "refusal_transfer": self.transfer.as_dict() if self.transfer else None,
            "routing": self.routing.as_dict() if self.routing else None,
            "errors": self.errors,
        }


def evaluate(suite: Suite, answers: Sequence[Answer], *, teacher_card: dict[str, Any] | None = None,
             student_card: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
             routing_target: float = 0.95, routing_min_items: int = 10,
             resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> EvalResult:
    """Every comparison for one suite; answers must include one teacher and one student answer per item."""
    items = suite.items
    teacher, student = split_roles(mark_degenerate(answers, refusal=suite.kind == "refusal"),
                                   [it.item_id for it in items])
    t_card = teacher_card or {"model": teacher[0].model if teacher else ""}
    s_card = student_card or {"model": student[0].model if student else ""}
    speeds = [speed(teacher, parameter_count=t_card.get("parameter_count")),
              speed(student, parameter_count=s_card.get("parameter_count"))]
    errors = {"teacher": sum(a.error is not None for a in teacher),
              "student": sum(a.error is not None for a in student)}
    base: dict[str, Any] = {"suite": suite.name, "kind": suite.kind, "items": len(items), "teacher": t_card,
                            "student": s_card, "metadata": {**suite.meta, **(metadata or {})}, "speed": speeds,
                            "errors": errors}
    if suite.kind == "refusal":
        return EvalResult(**base, transfer=refusal_transfer(items, teacher, student, resamples=resamples,
                                                            seed=seed))
    slices = retention_by_slice(items, teacher, student, json_format=suite.answer_format == "json",
                                resamples=resamples, seed=seed)
    lost, gained = flips([it.item_id for it in items], [it.text for it in items], [it.gold for it in items],
                         [a.label for a in teacher], [a.label for a in student])
    routing = None
    kinds = {a.confidence_kind for a in student if a.confidence is not None}
    if kinds:
        curve = coverage_curve([a.confidence for a in student],
                               [a.label == it.gold for a, it in zip(student, items, strict=True)],
                               [a.label == it.gold for a, it in zip(teacher, items, strict=True)])
        chosen = choose_threshold(curve, target=routing_target, min_items=routing_min_items)
        routing = Routing(sorted(k for k in kinds if k)[0], routing_target, routing_min_items, curve, chosen)
    return EvalResult(**base, slices=slices, lost=lost, gained=gained, routing=routing)
