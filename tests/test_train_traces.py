"""Reasoning traces as training data: the output type is governed like any other, the trace and the answer stay
apart on the row, and training uses the answer only, the trace + the answer, or the trace as an auxiliary target."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from _gateway_support import MAIN_POLICY, running_gateway, write_policies
from _generate_support import make_dataset, stored_rows
from _train_support import freeze_rows, make_tokenizer, save_model, toy_rows
from distillgate.data.generate import GatewayTarget, PromptTemplate, generate, parse_settings
from distillgate.data.store import WorkingCopy
from distillgate.data.trace_stats import trace_stats
from distillgate.errors import ConfigError
from distillgate.evals.answers import answer_item
from distillgate.evals.sources import OpenAIChatSource
from distillgate.evals.suites import Item, Suite
from distillgate.train import parse_config, run_recipe
from distillgate.train.config import ModelSource, PromptSettings, TraceSettings
from distillgate.train.encode import answer_ids, make_examples, prompt_ids
from distillgate.train.labels import score_labels
from distillgate.train.student import load_causal_lm

from fakes.fake_upstream import fake_upstream

PROMPT = PromptSettings(template="say the word {input}", system="classify")
TRACED_POLICY = {**MAIN_POLICY, "allowed_outputs": [*MAIN_POLICY["allowed_outputs"], "reasoning_traces"],
                 "quotas": {**MAIN_POLICY["quotas"], "records_per_run": 3}}


def _traced(rows: list[dict[str, Any]], every: int = 1) -> list[dict[str, Any]]:
    """Rows whose trace (in the toy vocabulary) names the rule: the first word decides the label."""
    return [{**r, "trace": f"the word {r['input'].split()[0]} card {r['label']}"} if i % every == 0 else r
            for i, r in enumerate(rows)]


# -- governed like any other output type ------------------------------------------------------------------------
def _generate(tmp: Path, policy: dict[str, Any], n: int) -> tuple[Any, list[dict[str, Any]]]:
    root = make_dataset(tmp, n)
    template = PromptTemplate(id="intent-v1", system="Think, then label.", user="{input}")
    settings = parse_settings({"model": "fake-teacher", "user": "alice", "project": "proj-a", "run": "t-1",
                               "output_type": "reasoning_traces", "concurrency": 1, "backoff_s": 0.01})
    with running_gateway(tmp, extra_config={"policy": str(write_policies(tmp / "p", policy))}) as gw, \
            WorkingCopy.open(root) as wc:
        gw.fake.set_reply("<think>The card has not come yet.</think>card_arrival")
        report = generate(wc, template, settings, GatewayTarget(gw.base_url, gw.keys["alice"]))
    return report, stored_rows(root)


def test_the_reasoning_traces_output_type_is_allowed_counted_and_blocked_by_policy(tmp_path: Path) -> None:
    report, rows = _generate(tmp_path / "allowed", TRACED_POLICY, 4)
    assert report.added == 3 and report.stopped_by is not None  # the 4th record is over records_per_run
    assert "RECORDS_PER_RUN_EXCEEDED" in report.stopped_by
    assert {(r["output_raw"], r["trace"]) for r in rows} == {("card_arrival", "The card has not come yet.")}
    assert all(r["sampling"]["reasoning"] == {"source": "think_tags", "complete": True, "chars": 26} for r in rows)
    blocked = {**MAIN_POLICY, "blocked_outputs": [*MAIN_POLICY["blocked_outputs"], "reasoning_traces"]}
    report, rows = _generate(tmp_path / "blocked", blocked, 2)
    assert report.added == 0 and "OUTPUT_TYPE_BLOCKED" in (report.stopped_by or []) and rows == []


# -- encoding ---------------------------------------------------------------------------------------------------
def test_the_three_uses_of_a_trace_encode_as_documented() -> None:
    tok = make_tokenizer()
    rows = _traced(toy_rows(4), every=2)  # rows 0 and 2 carry a trace
    plain, stats = make_examples(rows, tok, PROMPT, max_length=64, traces=TraceSettings())
    assert [e.answer for e in plain] == [answer_ids(tok, r["output"]) for r in rows] and "with_trace" not in stats

    joined, stats = make_examples(rows, tok, PROMPT, max_length=64,
                                  traces=TraceSettings(use="trace_answer", format="{trace} say {answer}"))
    assert joined[0].answer == answer_ids(tok, f"{rows[0]['trace']} say {rows[0]['output']}")
    assert joined[1].answer == answer_ids(tok, rows[1]["output"])  # no trace: the answer alone
    assert (stats["with_trace"], stats["without_trace"]) == (2, 2)

    multi, stats = make_examples(rows, tok, PROMPT, max_length=64,
                                 traces=TraceSettings(use="rationale", rationale_template="the word {input}"))
    assert [e.task for e in multi] == ["rationale", "answer", "answer", "rationale", "answer", "answer"]
    rationale, answer = multi[0], multi[1]
    assert rationale.answer == answer_ids(tok, rows[0]["trace"]) and rationale.row_id == f"{rows[0]['row_id']}#rationale"
    assert rationale.prompt == prompt_ids(tok, PromptSettings(template="the word {input}", system="classify"),
                                          rows[0]["input"])
    assert answer.prompt == prompt_ids(tok, PROMPT, rows[0]["input"])  # asked as at inference
    assert answer.answer == answer_ids(tok, rows[0]["output"])


def test_traces_need_a_causal_lm_sft_student_and_a_well_formed_template(tmp_path: Path) -> None:
    base = {"dataset": str(tmp_path), "output_dir": str(tmp_path / "o"), "student": {"model": {"path": "m"}}}
    with pytest.raises(ConfigError, match="recipe 'sft'"):
        parse_config({**base, "recipe": "kd", "kd": {"target": "top_logprobs"}, "traces": {"use": "rationale"}})
    with pytest.raises(ConfigError, match=r"\{trace\}"):
        parse_config({**base, "recipe": "sft", "traces": {"use": "trace_answer", "format": "{answer}"}})
    assert parse_config({**base, "recipe": "sft", "traces": {"use": "rationale"}}).traces.rationale_weight == 0.5


# -- a real (tiny) training run ---------------------------------------------------------------------------------
def _nll(model_dir: Path, prompt: PromptSettings, text: str, target: str) -> float:
    """Mean per-token negative log-likelihood of ``target`` (incl. eos) after ``prompt``."""
    model, tok = load_causal_lm(ModelSource(path=str(model_dir)))
    with torch.no_grad():
        score = score_labels(model, prompt_ids(tok, prompt, text), [answer_ids(tok, target)])
    return -float(score[0]) / len(answer_ids(tok, target))


@pytest.mark.slow
def test_rationale_training_learns_the_trace_as_an_auxiliary_target(tmp_path: Path) -> None:
    save_model(tmp_path / "student", seed=2, layers=2)
    rows = _traced(toy_rows(48))
    freeze_rows(tmp_path, rows)
    rationale_prompt = PromptSettings(template="the word {input}", system="classify")
    trained: dict[str, Path] = {}
    records: dict[str, Any] = {}
    for use in ("answer", "rationale"):
        out = tmp_path / use
        result = run_recipe(parse_config({
            "recipe": "sft", "dataset": str(tmp_path / "ds"), "output_dir": str(out), "prompt": PROMPT.model_dump(),
            "student": {"model": {"path": str(tmp_path / "student")}}, "epochs": 3, "batch_size": 8, "lr": 3e-3,
            "threads": 1, "traces": {"use": use, "rationale_template": "the word {input}", "rationale_weight": 1.0}},
            "test"))
        trained[use] = result.model_dir
        records[use] = json.loads(result.record_path.read_text())
    assert records["rationale"]["encoding"]["with_trace"] == 48
    assert records["rationale"]["traces"]["with_trace"] == 48 and records["rationale"]["traces"]["tokens"]["max"] == 5
    held = _traced(toy_rows(16, seed=5))
    nll = {use: sum(_nll(trained[use], rationale_prompt, r["input"], r["trace"]) for r in held) / len(held)
           for use in trained}
    # the rationale student learnt to explain (on unseen inputs); the answer-only one never saw a trace
    assert nll["rationale"] < nll["answer"] - 0.75, nll  # (measured: 1.93 against 3.08 nats per token)
    answer_nll = {use: sum(_nll(trained[use], PROMPT, r["input"], r["output"]) for r in held) / len(held)
                  for use in trained}
    assert all(math.isfinite(v) for v in answer_nll.values())
    # and the auxiliary target did not cost the answer (uniform over the 22 tokens is 3.09 nats)
    assert answer_nll["rationale"] < min(2.5, answer_nll["answer"] + 0.5), answer_nll


# -- evaluation and statistics ----------------------------------------------------------------------------------
def test_a_thinking_model_is_scored_on_the_answer_after_its_trace() -> None:
    suite = Suite("t", "classification", [Item("i1", "message", "card_arrival")], ["card_arrival", "lost_or_stolen_card"])
    with fake_upstream(reply="<think>maybe lost_or_stolen_card? no.</think>card_arrival") as up:
        answer = answer_item(suite, suite.items[0], OpenAIChatSource("thinker", up.base_url), "teacher", "generate")
    assert answer.label == "card_arrival"
    with fake_upstream(reply="<think>lost_or_stolen_card perhaps, let me think more") as up:  # cut off mid-thought
        answer = answer_item(suite, suite.items[0], OpenAIChatSource("thinker", up.base_url), "teacher", "generate")
    assert answer.label is None


def test_trace_stats_report_lengths_and_how_often_thinking_changed_the_answer() -> None:
    def row(input_id: str, label: str, trace: str | None) -> dict[str, Any]:
        return {"input_id": input_id, "output_raw": label, "label": label, "trace": trace,
                "sampling": {"reasoning": {"complete": True}} if trace else {}}

    rows = [row("a", "x", "one two three"), row("a", "y", None),  # thinking changed the answer
            row("b", "x", "four five"), row("b", "x", None),  # it did not
            row("c", "x", "six"), row("c", "x", "seven eight")]  # no untraced sample: not compared
    stats = trace_stats(rows)
    assert (stats["rows"], stats["with_trace"], stats["compared"], stats["answer_differs"]) == (6, 4, 2, 0.5)
    assert stats["words"]["max"] == 3.0 and stats["chars"]["mean"] == pytest.approx((13 + 9 + 3 + 11) / 4)
    assert trace_stats([row("a", "x", None)])["answer_differs"] is None


def test_the_run_report_shows_trace_lengths_answer_changes_and_grades(tmp_path: Path) -> None:
    from distillgate.data.versions import resolve_version
    from distillgate.pipeline.report import render, row_quality

    rows = _traced(toy_rows(6), every=2)
    for i, r in enumerate(rows):
        r["input_id"] = f"in{i // 2}"  # inputs of two samples: one after a trace, one without
        r["label"] = r["output"] = "yes"
        r["grade"], r["grading"] = (4.0, {"rubric_id": "helpful-v1"}) if i else (None, {"rubric_id": "helpful-v1"})
    rows[2]["label"] = rows[2]["output"] = "no"  # on input in1, thinking changed the answer
    quality = row_quality(resolve_version(freeze_rows(tmp_path, rows)))
    assert quality["traces"]["with_trace"] == 3 and quality["traces"]["compared"] == 3
    assert quality["traces"]["answer_differs"] == pytest.approx(1 / 3)
    assert quality["grades"] == {"graded": 5, "unparsed": 1, "mean": 4.0, "min": 4.0, "low_grade_filtered": 0,
                                 "rubric": "helpful-v1"}
    page = render({"name": "x", **quality}, [], {})
    assert "Reasoning traces" in page and "answer_differs" in page and "Rubric grades" in page
