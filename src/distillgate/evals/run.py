"""One evaluation of a teacher/student pair on one suite: answers, statistics, report, routing threshold.

Used by ``distillgate eval`` and by the ``eval`` stage of ``distillgate run``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillgate.errors import UserError
from distillgate.evals.answers import Answer, label_refusals, run_source, write_answers
from distillgate.evals.evaluate import EvalResult, evaluate
from distillgate.evals.refusal import make_detector
from distillgate.evals.report import write_report
from distillgate.evals.routing import RouteThreshold, save_threshold
from distillgate.evals.sources import AnswerSource, LabelScorer
from distillgate.evals.suites import Suite

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PairRun:
    result: EvalResult
    answers_path: Path
    metrics_path: Path
    report_path: Path
    threshold_path: Path | None
    answers: tuple[Answer, ...] = ()  # both models' answers, teacher first


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _bind(progress: Progress | None, role: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    report = progress

    def bound(done: int, total: int) -> None:
        report(role, done, total)

    return bound


def collect_answers(suite: Suite, teacher: AnswerSource, student: AnswerSource, *, student_mode: str = "auto",
                    progress: Progress | None = None) -> tuple[list[Answer], dict[str, dict[str, Any]]]:
    """Both models answer every item (the student by label scoring when it can, unless told to generate)."""
    answers: list[Answer] = []
    cards: dict[str, dict[str, Any]] = {}
    for role, source in (("teacher", teacher), ("student", student)):
        mode = "generate"
        if role == "student" and student_mode != "generate" and suite.kind == "classification" \
                and isinstance(source, LabelScorer):
            mode = "score"
        elif role == "student" and student_mode == "score":
            raise UserError("student mode 'score' needs a local student and a classification suite",
                            hint="use student mode 'generate'")
        answers += run_source(suite, source, role, mode=mode,  # type: ignore[arg-type]
                              progress=_bind(progress, role))
        cards[role] = source.describe()
    return answers, cards


def score_and_report(suite: Suite, answers: list[Answer], cards: dict[str, dict[str, Any]], out: Path, *,
                     metadata: dict[str, Any] | None = None, detector: str = "ngram", target: float = 0.95,
                     min_routed: int = 10, resamples: int = 2000, seed: int = 0) -> PairRun:
    """Statistics, report, metrics and routing threshold from stored answers."""
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {})
    seen = sorted({str(a.meta["x-policy-id"]) for a in answers if a.meta.get("x-policy-id")})
    if seen and not meta.get("policy_ids"):
        meta["policy_ids"] = seen  # as reported by the gateway's X-Policy-Id response header
    if suite.kind == "refusal":
        meta["detector"] = detector
        det = make_detector(detector)
        answers = label_refusals(answers, list(det.classify([a.raw for a in answers])))
    write_answers(out / "answers.jsonl", answers)
    result = evaluate(suite, answers, teacher_card=cards.get("teacher"), student_card=cards.get("student"),
                      metadata=meta, routing_target=target, routing_min_items=min_routed,
                      resamples=resamples, seed=seed)
    html, metrics = write_report(result, out)
    threshold_path = None
    if result.routing is not None:
        chosen = result.routing.chosen
        kind: Any = result.routing.confidence_kind
        threshold = RouteThreshold(
            threshold=chosen.threshold, confidence=kind, student=result.student.get("model", ""),
            teacher=result.teacher.get("model", ""), suite=result.suite, target=target, min_items=min_routed,
            coverage=chosen.coverage, student_accuracy=_finite(chosen.student_accuracy),
            teacher_accuracy=_finite(chosen.teacher_accuracy), system_accuracy=_finite(chosen.system_accuracy),
            items=result.items)
        threshold_path = out / "threshold.json"
        save_threshold(threshold, threshold_path)
    return PairRun(result, out / "answers.jsonl", metrics, html, threshold_path, tuple(answers))


def evaluate_pair(suite: Suite, teacher: AnswerSource, student: AnswerSource, out: Path, *,
                  student_mode: str = "auto", metadata: dict[str, Any] | None = None, detector: str = "ngram",
                  target: float = 0.95, min_routed: int = 10, resamples: int = 2000, seed: int = 0,
                  progress: Progress | None = None) -> PairRun:
    """Run both models on every item of ``suite``; write answers, cards, metrics, report and threshold."""
    answers, cards = collect_answers(suite, teacher, student, student_mode=student_mode, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cards.json").write_text(json.dumps(cards, indent=2, default=str) + "\n", encoding="utf-8")
    return score_and_report(suite, answers, cards, out, metadata=metadata, detector=detector, target=target,
                            min_routed=min_routed, resamples=resamples, seed=seed)
