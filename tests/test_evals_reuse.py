"""Teacher answers reused from the labelling run: only the first items go live, a changed teacher is caught, and
reused answers carry no latency (the speed figures leave them out) through the answers file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillgate.evals.answers import read_answers, run_source, write_answers
from distillgate.evals.reuse import ReusedTeacher, stored_answers
from distillgate.evals.sources import Generation, Message
from distillgate.evals.speed import speed
from distillgate.evals.suites import Item, Suite


class Scripted:
    """A live teacher that answers from a dict and counts its calls."""

    def __init__(self, answers: dict[str, str], name: str = "teacher") -> None:
        self.answers, self.name, self.calls = answers, name, 0

    def generate(self, messages: Sequence[Message], *, max_tokens: int) -> Generation:
        self.calls += 1
        return Generation(self.answers[str(messages[-1]["content"])], 0.25, 10, 1, math.log(0.9))

    def describe(self) -> dict[str, Any]:
        return {"model": self.name}

    def close(self) -> None:
        pass


def rows(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"row_id": f"r{i}:0", "input": text, "sample_index": 0, "teacher_label": label, "label": "edited",
             "label_probs": {label: 0.8, "other": 0.2}, "stamp": {"request_id": f"req-{i}"}}
            for i, (text, label) in enumerate(labels.items())]


def suite(texts: list[str]) -> Suite:
    return Suite("toy", "classification", [Item(f"r{i}:0", t, "a") for i, t in enumerate(texts)], ["a", "b"])


def test_only_the_first_items_are_asked_live_and_the_rest_reuse_the_stored_answer(tmp_path: Path) -> None:
    truth = {f"text {i}": "a" if i % 2 else "b" for i in range(10)}
    live = Scripted(truth)
    teacher = ReusedTeacher(live, stored_answers(rows(truth)), live_items=3)
    answers = run_source(suite(list(truth)), teacher, "teacher")
    assert live.calls == 3
    assert [a.label for a in answers] == list(truth.values())  # the teacher's answer, not the reviewer's edit
    assert [math.isfinite(a.latency_s) for a in answers] == [True] * 3 + [False] * 7
    assert answers[5].meta["stamp_request_id"] == "req-5" and answers[5].confidence == 0.8
    summary = teacher.describe()["reuse"]
    assert (summary["reused"], summary["asked_live"], summary["live_matches"]) == (7, 3, 3)
    fig = speed(answers, parameter_count=None)
    assert (fig.items, fig.untimed, fig.latency_mean_s) == (3, 7, 0.25)
    write_answers(tmp_path / "answers.jsonl", answers)
    assert '"latency_s": null' in (tmp_path / "answers.jsonl").read_text()  # strict JSON, no NaN
    back = read_answers(tmp_path / "answers.jsonl")
    assert [math.isfinite(a.latency_s) for a in back] == [math.isfinite(a.latency_s) for a in answers]


def test_a_teacher_that_changed_since_labelling_is_reported_as_a_mismatch() -> None:
    stored = {f"text {i}": "a" for i in range(6)}
    live = Scripted({**stored, "text 1": "b"})  # the teacher now answers one item differently
    teacher = ReusedTeacher(live, stored_answers(rows(stored)), live_items=4)
    answers = run_source(suite(list(stored)), teacher, "teacher")
    assert answers[1].label == "b"  # a live answer is what the teacher said now
    summary = teacher.summary()
    assert summary["live_matches"] == 3 and summary["mismatches"] == [{"row_id": "r1:0", "stored": "a", "live": "b"}]


def test_an_item_without_a_stored_answer_is_asked_live() -> None:
    live = Scripted({"new text": "a", "old": "b"})
    teacher = ReusedTeacher(live, stored_answers(rows({"old": "b"})), live_items=0)
    answers = run_source(suite(["old", "new text"]), teacher, "teacher")
    assert live.calls == 1 and teacher.missing == 1 and [a.label for a in answers] == ["b", "a"]
    assert math.isfinite(answers[1].latency_s) and not math.isfinite(answers[0].latency_s)
