"""Every answer of an evaluation run, one JSON line each: what was asked, what came back, what it cost.

An answers file (``answers.jsonl``) holds both models' answers; ``role`` says which is which. It is the input of
every later step (metrics, routing, re-scoring refusals with another detector), so nothing is recomputed from
the models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from distillgate.errors import NotFoundError, UserError
from distillgate.evals.degenerate import degenerate_reason
from distillgate.evals.refusal import is_refused
from distillgate.evals.sources import AnswerSource, LabelScorer
from distillgate.evals.suites import Item, Suite
from distillgate.traces import split_think

Role = Literal["teacher", "student"]
AnswerMode = Literal["generate", "score"]
ANSWERS_SCHEMA = "distillgate.answers/1"


@dataclass(frozen=True)
class Answer:
    item_id: str
    role: Role
    model: str
    raw: str
    label: str | None  # parsed label (classification) or refusal kind (refusal.KINDS); None if degenerate
    confidence: float | None  # probability of ``label`` (score mode) or exp(mean token log-prob) (generate mode)
    confidence_kind: str | None  # "label_prob" | "mean_token_prob"
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    schema: str = ANSWERS_SCHEMA

    @property
    def refused(self) -> bool:
        return is_refused(self.label)

    @property
    def degenerate(self) -> str | None:
        """Why the generated text is no answer (``evals.degenerate``), or None; a failed request is not judged."""
        return degenerate_reason(self.raw) if self.error is None else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_item(suite: Suite, item: Item, source: AnswerSource, role: Role, mode: AnswerMode) -> Answer:
    """Ask ``source`` about one item. ``score`` mode needs a ``LabelScorer`` and a classification suite."""
    messages = suite.messages(item, role)
    if mode == "score":
        if not isinstance(source, LabelScorer) or suite.kind != "classification":
            raise UserError(f"{source.name} cannot score labels on suite {suite.name!r}",
                            hint="label scoring needs a local model and a classification suite; use generate")
        probs, seconds = source.score_labels(messages, suite.labels)
        best = max(range(len(probs)), key=probs.__getitem__)
        chosen = suite.labels[best]
        return Answer(item.item_id, role, source.name, chosen, chosen, probs[best], "label_prob", seconds,
                      0, 0, meta={"top": sorted(zip(probs, suite.labels, strict=True), reverse=True)[:3]})
    gen = source.generate(messages, max_tokens=suite.max_tokens)
    confidence = math.exp(gen.mean_logprob) if gen.mean_logprob is not None else None
    # a model that thinks aloud (a trace_answer student, a reasoning teacher) is scored on the answer after its
    # trace; an unclosed <think> leaves no answer (distillgate.traces)
    answer = split_think(gen.text).answer
    label = (suite.parse(answer) if suite.kind == "classification" and gen.error is None
             and degenerate_reason(answer) is None else None)
    return Answer(item.item_id, role, source.name, gen.text, label, confidence,
                  "mean_token_prob" if confidence is not None else None, gen.latency_s, gen.prompt_tokens,
                  gen.completion_tokens, gen.error, gen.meta)


def run_source(suite: Suite, source: AnswerSource, role: Role, *, mode: AnswerMode = "generate",
               progress: Callable[[int, int], None] | None = None) -> list[Answer]:
    """Answer every item of ``suite`` in order."""
    answers = []
    for i, item in enumerate(suite.items):
        answers.append(answer_item(suite, item, source, role, mode))
        if progress is not None:
            progress(i + 1, len(suite.items))
    return answers


def label_refusals(answers: Iterable[Answer], kinds: list[str]) -> list[Answer]:
    """Attach a detector's refusal kind (``refusal.KINDS``) to answers of a refusal suite."""
    answers = list(answers)
    if len(kinds) != len(answers):
        raise UserError("detector returned a different number of labels than answers", hint="this is a bug")
    return mark_degenerate([replace(a, label=k if a.error is None else None)
                            for a, k in zip(answers, kinds, strict=True)], refusal=True)


def mark_degenerate(answers: Iterable[Answer], *, refusal: bool) -> list[Answer]:
    """A degenerate answer is no answer: its label becomes ``degenerate`` (refusal suites) or None
    (classification: it counts as wrong), and ``meta["degenerate"]`` names the reason. Applied to every answer
    before it is scored, stored answers included, so no scorer can take junk for compliance or a label."""
    out = []
    for a in answers:
        reason = a.degenerate
        if reason is None:
            out.append(a)
            continue
        out.append(replace(a, label="degenerate" if refusal else None, meta={**a.meta, "degenerate": reason}))
    return out


def write_answers(path: Path, answers: Iterable[Answer]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for answer in answers:
            record = answer.as_dict()
            if not math.isfinite(record["latency_s"]):
                record["latency_s"] = None  # not timed (a reused answer): strict JSON has no NaN
            fh.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")


def read_answers(path: Path) -> list[Answer]:
    if not path.exists():
        raise NotFoundError(f"answers file {path} does not exist", hint="run `distillgate eval` first")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if data.get("latency_s") is None:
                data["latency_s"] = float("nan")
            out.append(Answer(**data))
        except (ValueError, TypeError) as exc:
            raise UserError(f"{path}:{n} is not an answers record: {exc}",
                            hint="answers files are written by `distillgate eval`; do not edit them by hand") from exc
    return out


def split_roles(answers: Iterable[Answer], item_ids: list[str]) -> tuple[list[Answer], list[Answer]]:
    """(teacher, student) answers in ``item_ids`` order; every item must have one of each."""
    by_role: dict[str, dict[str, Answer]] = {"teacher": {}, "student": {}}
    for answer in answers:
        by_role[answer.role][answer.item_id] = answer
    missing = [i for i in item_ids if i not in by_role["teacher"] or i not in by_role["student"]]
    if missing:
        raise UserError(f"{len(missing)} item(s) lack a teacher or student answer, e.g. {missing[:3]}",
                        hint="evaluate both models on the same items")
    return [by_role["teacher"][i] for i in item_ids], [by_role["student"][i] for i in item_ids]
