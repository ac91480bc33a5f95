"""Correcting a structured answer: the JSON editor over real HTTP, and ``review.correct_answer`` underneath it
(schema validation with the schema filter's validator, normalisation, the review trail, rebuilds and versions)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import orjson
import pytest

from _web_support import (
    EXTRACT_ANSWER,
    STRUCTURED_ROW,
    LiveSite,
    csrf_of,
    live_site,
    version_of,
)
from distillgate.data import review
from distillgate.data.normalize import normalise_output
from distillgate.data.pipeline import build
from distillgate.data.store import WorkingCopy
from distillgate.data.versions import freeze, load_version, open_version
from distillgate.errors import UserError

URL = "/rows/ds-traffic-7%3A0"
GOOD = {"category": "request_refund", "amount": 20, "currency": "EUR", "explanation": "charged twice"}
GOOD_OUTPUT = orjson.dumps(GOOD, option=orjson.OPT_SORT_KEYS).decode()


def _teacher_output(review_wc: WorkingCopy) -> str:
    return normalise_output(EXTRACT_ANSWER, review_wc.config.normalise).output


def test_a_structured_row_offers_the_json_editor_instead_of_the_label_picker(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        client = live.sign_in("alice")
        page = client.get(URL)
        text = html.unescape(page.text)
        assert page.status_code == 200
        assert '<label for="answer-json">Corrected answer (JSON)</label>' in text
        assert 'id="label"' not in text  # no label picker for a structured task
        editor = html.unescape(page.text.split('name="answer_json"', 1)[1].split(">\n", 1)[1]
                               .split("</textarea>", 1)[0])
        assert json.loads(editor) == json.loads(_output_of(live))  # the current answer ...
        assert '\n  "amount": "twenty",\n' in editor  # ... pretty-printed
        assert "Schema of task extract" in text and '"pattern": "^[A-Z]{3}$"' in text
        plain = html.unescape(client.get("/rows/ds-traffic-1%3A0").text)
        assert 'id="label"' in plain and 'id="answer-json"' not in plain  # other tasks keep the picker


def _output_of(live: LiveSite) -> str:
    review_wc = live.dataset()
    try:
        return str(review_wc.get(STRUCTURED_ROW).output)
    finally:
        review_wc.close()


@pytest.mark.parametrize(("answer", "message"), [
    ('{"category": "request_refund", "amount": 20,', "the answer is not valid JSON: "),
    ('[1, 2]', "the answer must be a JSON object, not an array"),
    ('{"category": "request_refund", "amount": "twenty", "currency": "EUR"}',
     "the answer does not match the task's schema: at $.amount: 'twenty' is not of type 'number'"),
    ('{"category": "request_refund", "amount": 20, "currency": "euro"}',
     "at $.currency: 'euro' does not match '^[A-Z]{3}$'"),
    ('{"category": "request_refund", "amount": 20}', "at $: 'currency' is a required property"),
])
def test_the_server_refuses_answers_that_break_the_schema_and_keeps_the_text(
        tmp_path: Path, answer: str, message: str) -> None:
    with live_site(tmp_path) as live:
        client = live.sign_in("alice")
        page = client.get(URL)
        reply = client.post(URL + "/correct", data={"csrf": csrf_of(page.text), "row_version": str(
            version_of(page.text)), "answer_json": answer, "reason": "amount is a number"})
        assert reply.status_code == 400
        text = html.unescape(reply.text)
        assert "Not saved: the answer " in text and message in text
        assert 'id="answer-json-error"' in text and 'aria-invalid="true"' in text
        editor = html.unescape(reply.text.split('name="answer_json"', 1)[1].split(">\n", 1)[1]
                               .split("</textarea>", 1)[0])
        assert editor == answer  # the reviewer's text, exactly
        assert 'value="amount is a number"' in text  # and the reason
        assert _output_of(live) == _teacher_output_live(live)  # nothing written
        assert live.events() == []


def _teacher_output_live(live: LiveSite) -> str:
    review_wc = live.dataset()
    try:
        return _teacher_output(review_wc)
    finally:
        review_wc.close()


def test_a_valid_answer_is_stored_with_its_trail_and_logged(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        client = live.sign_in("alice")
        page = client.get(URL)
        version = version_of(page.text)
        typed = json.dumps({"type": "Request Refund", "currency": "EUR", "amount": 20,
                            "explanation": "  charged   twice "}, indent=2)
        reply = client.post(URL + "/correct", data={"csrf": csrf_of(page.text), "row_version": str(version),
                                                    "answer_json": typed, "reason": "the amount is 20 EUR"})
        assert reply.status_code == 303
        review_wc = live.dataset()
        try:
            row = review_wc.get(STRUCTURED_ROW)
            teacher = _teacher_output(review_wc)
        finally:
            review_wc.close()
        # normalised like a teacher answer: key alias, canonical label, sorted keys, squeezed explanation
        assert row.output == GOOD_OUTPUT and row.label == "request_refund"
        assert row.output_raw == EXTRACT_ANSWER and row.teacher_label == "request_refund"  # the teacher's, kept
        assert (row.review_state, row.edited, row.reviewer, row.version) == ("corrected", True, "alice", version + 1)
        assert row.review_reason == "the amount is 20 EUR" and row.reviewed_at
        assert row.review_before == {"label": "request_refund", "review_state": "unreviewed",
                                     "filter_status": "fail", "output": teacher}
        assert row.review_after == {"label": "request_refund", "review_state": "corrected",
                                    "filter_status": "fail", "output": GOOD_OUTPUT}
        (event,) = live.events()
        assert (event["action"], event["row_id"], event["reviewer"], event["run"], event["edited"]) == (
            "correct", STRUCTURED_ROW, "alice", "run-7", True)
        assert event["before"]["output"] == teacher and event["after"]["output"] == GOOD_OUTPUT
        assert event["row_version"] == version + 1
        after = html.unescape(client.get(URL).text)
        assert "answer rewritten" in after and '"amount": 20' in after


def test_a_rebuild_keeps_the_human_answer_and_versions_carry_it(review_wc: WorkingCopy) -> None:
    row = review_wc.get(STRUCTURED_ROW)
    assert row.filter_reasons == ["SCHEMA_MISMATCH"]
    review.correct_answer(review_wc, row.row_id, "alice", row.version, json.dumps(GOOD), "amount is a number")
    build(review_wc)
    rebuilt = review_wc.get(STRUCTURED_ROW)
    assert (rebuilt.output, rebuilt.label, rebuilt.filter_status) == (GOOD_OUTPUT, "request_refund", "pass")
    version = freeze(review_wc)
    (stored,) = [r for r in load_version(version.path) if r["row_id"] == STRUCTURED_ROW]
    assert stored["output"] == GOOD_OUTPUT and stored["review_after"]["output"] == GOOD_OUTPUT
    # a later verdict without an answer gives the teacher's answer back, and the trail says so
    again = review_wc.get(STRUCTURED_ROW)
    accepted = review.accept(review_wc, again.row_id, "bob", again.version, "the teacher was right after all")
    teacher = _teacher_output(review_wc)
    assert accepted.row.output == teacher
    assert accepted.row.review_before["output"] == GOOD_OUTPUT  # type: ignore[index]
    assert accepted.row.review_after["output"] == teacher  # type: ignore[index]
    build(review_wc)
    assert review_wc.get(STRUCTURED_ROW).output == teacher
    second = freeze(review_wc)
    from distillgate.data.versions import diff

    (change,) = [c for c in diff(open_version(version.path), second).changes if c.row_id == STRUCTURED_ROW]
    assert "human edit" in change.causes and "normalisation change" not in change.causes


def test_correct_answer_checks_the_task_and_the_allowed_labels(review_wc: WorkingCopy) -> None:
    plain = review_wc.get("ds-traffic-1:0")
    with pytest.raises(UserError, match="task 'default' has no json_schema"):
        review.correct_answer(review_wc, plain.row_id, "alice", plain.version, json.dumps(GOOD), "x")
    row = review_wc.get(STRUCTURED_ROW)
    with pytest.raises(UserError, match=r"at \$.category: 'pizza' is not one of"):
        review.correct_answer(review_wc, row.row_id, "alice", row.version, json.dumps({**GOOD, "category": "pizza"}), "x")
    with pytest.raises(UserError, match="needs a reason"):
        review.correct_answer(review_wc, row.row_id, "alice", row.version, json.dumps(GOOD), " ")
    assert review.answer_schema(review_wc, "extract") is not None and review.answer_schema(review_wc, "default") is None
    assert review_wc.get(STRUCTURED_ROW).version == row.version  # nothing written


def test_allowed_labels_apply_when_the_schema_does_not_name_them(tmp_path: Path) -> None:
    from _data_support import make_dataset

    schema = {"type": "object", "required": ["category"]}
    records = [{"id": "1", "text": "where is my card", "answer": '{"category": "card_arrival"}'}]
    review_wc = make_dataset(tmp_path, records, {"filters": {"json_schema": schema, "allowed_labels": ["card_arrival"]}})
    try:
        build(review_wc)
        row = review_wc.get("ds-traffic-1:0")
        with pytest.raises(UserError, match="names label 'exchange_rate', which is not an allowed label"):
            review.correct_answer(review_wc, row.row_id, "alice", row.version, '{"category": "exchange rate"}', "x")
        with pytest.raises(UserError, match="names no label \\(key 'category'\\)"):
            review.correct_answer(review_wc, row.row_id, "alice", row.version, '{"category": 3}', "x")
        done = review.correct_answer(review_wc, row.row_id, "alice", row.version, '{"category": "Card-Arrival"}', "x")
        assert (done.row.output, done.row.label) == ('{"category":"card_arrival"}', "card_arrival")
    finally:
        review_wc.close()


def test_a_label_correction_of_a_json_answer_renames_the_label_inside_the_answer(review_wc: WorkingCopy) -> None:
    """`review correct --label` on a row whose answer is a JSON object: training reads the answer, so the answer
    must name the corrected label too; everything else in it stays the teacher's, and the trail shows both."""
    row = review_wc.get(STRUCTURED_ROW)
    teacher = json.loads(str(row.output))
    assert teacher["category"] == "request_refund"
    done = review.correct(review_wc, row.row_id, "alice", row.version, "lost_or_stolen_card", "it is a stolen card")
    answer = json.loads(str(done.row.output))
    assert answer == {**teacher, "category": "lost_or_stolen_card"}
    assert (done.row.label, done.row.edited, done.row.review_state) == ("lost_or_stolen_card", True, "corrected")
    assert done.row.review_before["output"] == row.output  # type: ignore[index]
    assert done.row.review_after["output"] == done.row.output  # type: ignore[index]
    build(review_wc)
    assert json.loads(str(review_wc.get(STRUCTURED_ROW).output))["category"] == "lost_or_stolen_card"
    again = review_wc.get(STRUCTURED_ROW)
    accepted = review.accept(review_wc, again.row_id, "bob", again.version, "the teacher was right")
    assert accepted.row.output == _teacher_output(review_wc) and accepted.row.label == "request_refund"


def test_a_label_correction_of_a_plain_answer_changes_the_label_only(tmp_path: Path) -> None:
    from _data_support import make_dataset

    records = [{"id": "1", "text": "where is my card", "answer": "card arrival, I think"}]
    plain_wc = make_dataset(tmp_path, records, {"filters": {"allowed_labels": ["card_arrival", "lost_or_stolen_card"]}})
    try:
        build(plain_wc)
        row = plain_wc.get("ds-traffic-1:0")
        fixed = review.correct(plain_wc, row.row_id, "alice", row.version, "lost_or_stolen_card", "stolen")
        assert fixed.row.output == row.output and fixed.row.label == "lost_or_stolen_card"
        assert "output" not in (fixed.row.review_after or {})
    finally:
        plain_wc.close()
