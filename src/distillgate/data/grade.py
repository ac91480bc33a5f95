"""Rubric grading: the teacher is not always right, so a grader grades every answer against the dataset's rubric.

    rows with an answer ─rubric prompt─▶ gateway (output type ``rubrics``) ──▶ grader ──▶ grade on the row

Choices, and why:

- **A governed call like any other.** Each grade is one chat call through the policy gateway with
  ``X-Policy-Output-Type: rubrics`` (``rubric.output_type``): the policy allows or blocks grading, quotas count it,
  the decision log records it and the answer carries a signed stamp, kept in ``grading.stamp``. A policy denial
  stops the job (what was graded is kept) and is reported with its reason codes; it is never retried.
- **The rubric is data.** ``rubric.criteria`` (name + description) and ``rubric.scale`` (integer points) are
  declared in the dataset config; the rubric's sha256 is stored with every grade, so an edited rubric regrades the
  rows graded under the old one and a grade never outlives the rubric that produced it.
- **Its own or another sample's answer.** Every row (every one of the k samples) is graded on its own; the grader
  is ``rubric.model`` when set (another model judging the teacher), else the model that wrote the answer.
- **Two ways to read a grade.** ``scoring: text`` parses the reply: a JSON object ``{"scores": {criterion: n}}``
  (the grade is the mean of the criteria on the scale) or the first integer on the scale. A reply that yields
  neither, or a point off the scale, is *unparsed*: ``grade`` stays null and ``grading.error`` says why, so the
  ``min_grade`` filter fails it closed (``UNGRADED``). ``scoring: label_choices`` asks a teacher that scores label
  sets (the local teacher) for its distribution over the scale's points: the grade is the most probable point and
  ``grading.probs`` keeps the distribution, so a small model that cannot write JSON still grades.
- **Grades pick what people review.** ``filters.min_grade`` fails rows below it (``LOW_GRADE``); the review queue
  ``low_grade`` lists rows below ``review.low_grade_below``, and ``priority`` orders rows that are low-graded or whose
  k samples disagree by both together (``distillgate.data.review``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from distillgate.canonical import hash_json
from distillgate.data.config import RubricConfig
from distillgate.data.generate import GatewayTarget
from distillgate.data.generate import _error_body as error_body
from distillgate.data.schema import Row
from distillgate.data.store import WorkingCopy
from distillgate.errors import ConflictError
from distillgate.traces import split_message

_INT = re.compile(r"(?<![\d.])-?\d+(?![\d.])")


@dataclass
class GradeReport:
    graded: int = 0
    unparsed: int = 0
    already_graded: int = 0
    failed: int = 0
    conflicts: int = 0
    tokens: int = 0
    stopped_by: list[str] | None = None
    stop_message: str | None = None
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("graded", "unparsed", "already_graded", "failed", "conflicts",
                                              "tokens", "stopped_by", "stop_message", "failures")}


def rubric_sha256(rubric: RubricConfig) -> str:
    """What a grade depends on: the criteria, the scale, the grader and how it is asked."""
    return hash_json(rubric.model_dump(exclude={"concurrency"}))


def points(rubric: RubricConfig) -> list[int]:
    return list(range(rubric.scale.min, rubric.scale.max + 1))


def grading_messages(rubric: RubricConfig, row: Row) -> list[dict[str, str]]:
    """The grader's prompt: the rubric as the system message, the input and the answer as the user message."""
    lo, hi = rubric.scale.min, rubric.scale.max
    criteria = "\n".join(f"- {c.name}: {c.description}" for c in rubric.criteria)
    names = ", ".join(f'"{c.name}": <{lo}-{hi}>' for c in rubric.criteria)
    reply = (f"Reply with only one integer from {lo} to {hi}." if rubric.scoring == "label_choices" else
             f'Reply with only a JSON object {{"scores": {{{names}}}}}, or one integer from {lo} to {hi}.')
    system = (f"You grade an answer to a request against a rubric, on a scale from {lo} (worst) to {hi} (best).\n"
              f"Criteria:\n{criteria}\n{reply}")
    answer = row.output if row.output is not None else (row.output_raw or "")
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Request:\n{row.input}\n\nAnswer:\n{answer}"}]


def parse_grade(text: str, rubric: RubricConfig) -> tuple[float | None, dict[str, int] | None, str | None]:
    """(grade, per-criterion scores, error) read from a grader's reply; a grade is always on the scale."""
    lo, hi = rubric.scale.min, rubric.scale.max
    body = text.strip()
    start, end = body.find("{"), body.rfind("}")
    if 0 <= start < end:
        try:
            data = json.loads(body[start:end + 1])
        except ValueError:
            data = None
        scores = data.get("scores") if isinstance(data, dict) else None
        if isinstance(scores, dict):
            got: dict[str, int] = {}
            for c in rubric.criteria:
                value = scores.get(c.name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                    return None, None, f"criterion {c.name!r} has no integer score in the reply"
                if not lo <= int(value) <= hi:
                    return None, None, f"criterion {c.name!r} scored {value}, off the scale {lo}..{hi}"
                got[c.name] = int(value)
            return sum(got.values()) / len(got), got, None
    found = _INT.search(body)
    if found is None:
        return None, None, "the reply holds no JSON scores and no integer"
    value = int(found.group())
    if not lo <= value <= hi:
        return None, None, f"the reply's grade {value} is off the scale {lo}..{hi}"
    return float(value), None, None


def _due(row: Row, sha: str, regrade: bool) -> bool:
    if row.output_raw is None:
        return False
    if regrade or not row.grading:
        return True
    return row.grading.get("rubric_sha256") != sha


@dataclass
class _Answer:
    row: Row
    grade: float | None = None
    grading: dict[str, Any] | None = None
    denied: tuple[list[str], str] | None = None
    failure: str | None = None
    tokens: int = 0


class _Grader:
    def __init__(self, rubric: RubricConfig, target: GatewayTarget, *, model: str, user: str, project: str,
                 run: str, timeout_s: float) -> None:
        import openai

        self.rubric, self.model, self.sha = rubric, model, rubric_sha256(rubric)
        self.client = openai.OpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=2,
                                    timeout=timeout_s)
        self.headers = {"X-Policy-User": user, "X-Policy-Project": project, "X-Policy-Run": run,
                        "X-Policy-Output-Type": rubric.output_type}

    def ask(self, row: Row) -> _Answer:
        import openai

        r = self.rubric
        body: dict[str, Any] = {"model": self.model, "messages": grading_messages(r, row), "n": 1,
                                "max_tokens": r.max_tokens, "temperature": r.temperature, "seed": 0,
                                "extra_headers": self.headers}
        if r.scoring == "label_choices":
            body["extra_body"] = {"label_choices": [str(p) for p in points(r)]}
        try:
            resp = self.client.chat.completions.create(**body)
        except openai.APIStatusError as exc:
            err = error_body(exc)
            reasons = [str(x) for x in (err.get("reasons") or [])]
            message = str(err.get("message") or exc.message)
            if reasons and exc.status_code in (400, 401, 403, 429):
                return _Answer(row, denied=(reasons, message))
            return _Answer(row, failure=f"HTTP {exc.status_code}: {message}")
        except openai.APIConnectionError as exc:
            return _Answer(row, failure=f"{type(exc).__name__}: {exc}")
        meta = (resp.model_extra or {}).get("distillgate")
        stamp = meta.get("stamp") if isinstance(meta, dict) else None
        if not isinstance(stamp, dict) or not resp.choices:
            return _Answer(row, failure="the grader's answer carries no distillgate provenance stamp "
                                        "(grade through a distillgate gateway)")
        choice = resp.choices[0]
        traced = split_message({**(choice.message.model_extra or {}), "content": choice.message.content})
        grading: dict[str, Any] = {"rubric_id": r.id, "rubric_sha256": self.sha, "model": self.model,
                                   "scale": [r.scale.min, r.scale.max], "raw": traced.answer, "stamp": stamp,
                                   "scores": None, "error": None}
        served = (choice.model_extra or {}).get("label_probs")
        grade: float | None
        if r.scoring == "label_choices" and isinstance(served, dict) and served:
            on_scale = {str(p) for p in points(r)}
            probs = {str(k): float(v) for k, v in served.items() if str(k) in on_scale
                     and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if probs:
                best = max(probs, key=lambda k: probs[k])
                grade, grading["probs"] = float(best), probs
            else:  # a teacher that scored other labels than the scale's points: no grade, never a guess
                grade, grading["error"] = None, "the grader's label_probs name no point of the scale"
        else:
            grade, grading["scores"], grading["error"] = parse_grade(traced.answer, r)
        tokens = int(resp.usage.total_tokens) if resp.usage is not None else 0
        return _Answer(row, grade, grading, tokens=tokens)

    def close(self) -> None:
        self.client.close()


def grade(wc: WorkingCopy, rubric: RubricConfig, target: GatewayTarget, *, model: str, user: str, project: str,
          run: str, regrade: bool = False, timeout_s: float = 120.0,
          on_progress: Callable[[int], None] | None = None) -> GradeReport:
    """Grade every answer of ``wc`` not yet graded under ``rubric`` (all of them with ``regrade``).

    Never raises for a policy denial: read ``report.stopped_by``. A row edited while it was graded keeps the edit
    (the grade is dropped and counted in ``conflicts``; a rerun grades it)."""
    sha = rubric_sha256(rubric)
    rows = wc.rows()
    todo = [r for r in rows if _due(r, sha, regrade)]
    report = GradeReport(already_graded=sum(1 for r in rows if r.output_raw is not None) - len(todo))
    grader = _Grader(rubric, target, model=model, user=user, project=project, run=run, timeout_s=timeout_s)
    try:
        _run(wc, grader, todo, rubric.concurrency, report, on_progress)
    finally:
        grader.close()
    return report


def _run(wc: WorkingCopy, grader: _Grader, todo: Sequence[Row], concurrency: int, report: GradeReport,
         on_progress: Callable[[int], None] | None) -> None:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for start in range(0, len(todo), concurrency):  # one wave at a time, so a denial stops the next waves
            for answer in pool.map(grader.ask, todo[start:start + concurrency]):
                _store(wc, answer, report)
                if on_progress is not None:
                    on_progress(1)
            if report.stopped_by is not None:
                return


def _store(wc: WorkingCopy, answer: _Answer, report: GradeReport) -> None:
    if answer.denied is not None:
        if report.stopped_by is None:
            report.stopped_by, report.stop_message = answer.denied
        return
    if answer.failure is not None or answer.grading is None:
        report.failed += 1
        if len(report.failures) < 20:
            report.failures.append(f"{answer.row.row_id}: {answer.failure}")
        return
    row = answer.row
    expected = row.version
    row.grade, row.grading = answer.grade, answer.grading
    try:
        wc.update_row(row, expected)
    except ConflictError:
        report.conflicts += 1
        return
    report.tokens += answer.tokens
    if answer.grade is None:
        report.unparsed += 1
    else:
        report.graded += 1
