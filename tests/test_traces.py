"""Reasoning traces are captured apart from the answer: the three wire shapes, cut-off thoughts, and through the
real gateway in front of the fake teacher, onto the stored row."""

from __future__ import annotations

from pathlib import Path

from _gateway_support import running_gateway
from _generate_support import make_dataset, stored_rows
from distillgate.data.generate import GatewayTarget, PromptTemplate, generate, parse_settings
from distillgate.data.store import WorkingCopy
from distillgate.traces import split_message, split_think

from fakes.fake_upstream import Behaviour


def test_think_tags_opening_the_answer_are_the_trace() -> None:
    traced = split_think("  <think>\nThe card has not come; that is card_arrival.\n</think>\n\ncard_arrival")
    assert (traced.answer, traced.trace, traced.source) == (
        "card_arrival", "The card has not come; that is card_arrival.", "think_tags")
    assert split_think("<THINK>x</Think>y").answer == "y"


def test_a_think_tag_quoted_later_is_answer_text() -> None:
    text = "Use the <think> tag to show reasoning.</think> Done."
    traced = split_think(text)
    assert traced.answer == text and traced.trace is None and traced.source is None


def test_an_unclosed_think_block_is_all_trace_and_no_answer() -> None:
    traced = split_think("<think>Let me weigh card_arrival against card_linking and")
    assert traced.answer == "" and traced.complete is False
    assert traced.trace == "Let me weigh card_arrival against card_linking and"


def test_reasoning_fields_beside_the_content() -> None:
    assert split_message({"content": "refund", "reasoning_content": " asked for money back "}).as_dict() == {
        "trace": "asked for money back", "source": "reasoning_content", "complete": True, "chars": 20}
    structured = split_message({"content": "refund", "reasoning": {"summary": "money back"}})
    assert (structured.answer, structured.trace, structured.source) == ("refund", "money back", "reasoning")
    both = split_message({"content": "<think>again</think>refund", "reasoning_content": "first"})
    assert (both.answer, both.trace) == ("refund", "first")
    plain = split_message({"content": "refund", "reasoning": None})
    assert (plain.answer, plain.trace) == ("refund", None)


def test_generation_keeps_the_trace_apart_from_the_answer_on_the_row(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 2)
    template = PromptTemplate(id="intent-v1", system="You label banking messages.", user="Message: {input}")
    settings = parse_settings({"model": "fake-teacher", "user": "alice", "project": "proj-a", "run": "gen-1",
                               "output_type": "summaries", "concurrency": 1, "backoff_s": 0.01})
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        gw.fake.push(Behaviour.answer({
            "id": "x", "object": "chat.completion", "created": 0, "model": "fake-teacher",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "card_arrival", "reasoning_content": "It has not arrived."}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}))
        gw.fake.set_reply("<think>A lost card is card_arrival.</think>card_arrival")
        report = generate(wc, template, settings, GatewayTarget(gw.base_url, gw.keys["alice"]))
    assert report.added == 2
    rows = stored_rows(root)
    assert [r["output_raw"] for r in rows] == ["card_arrival", "card_arrival"]
    traces = sorted((r["sampling"]["reasoning"]["source"], r["trace"]) for r in rows)
    assert all("trace" not in r["sampling"]["reasoning"] for r in rows)  # one copy: the row's own field
    assert traces == [("reasoning_content", "It has not arrived."), ("think_tags", "A lost card is card_arrival.")]
