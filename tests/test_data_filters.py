"""Normalisation of answer shapes and every filter's reason code, run through the real build pipeline."""

from __future__ import annotations

import json

import pytest

from _data_support import BANKING_LABELS, make_dataset, teacher_answer
from distillgate.data.config import NormaliseConfig, parse_config
from distillgate.data.filters import REASONS, compile_filters
from distillgate.data.normalize import normalise_output
from distillgate.data.pipeline import build, process
from distillgate.data.schema import Row
from distillgate.errors import ConfigError


def test_normalise_stable_keys_labels_and_trimming():
    cfg = NormaliseConfig(label_aliases={"lost_card": "lost_or_stolen_card"}, max_explanation_chars=20)
    raw = 'Sure! ```json\n{"Type": "Lost Card", "explanation": "The   customer says the card was lost yesterday"}\n```'
    out = normalise_output(raw, cfg)
    assert out.parsed and out.label == "lost_or_stolen_card"
    assert json.loads(out.output) == {"category": "lost_or_stolen_card", "explanation": "The customer says…"}
    # `category` and `type` spellings give the same canonical output
    a = normalise_output('{"category": "card-arrival"}', cfg)
    b = normalise_output('{"type": "Card Arrival"}', cfg)
    assert a.output == b.output == '{"category":"card_arrival"}'


def test_normalise_refusals_plain_labels_and_probs():
    cfg = NormaliseConfig()
    refusal = normalise_output("I'm sorry, but I cannot help with that request.", cfg)
    assert refusal.refusal and refusal.output == cfg.refusal_text and refusal.label == "refusal"
    plain = normalise_output(" Card_Arrival. ", cfg)
    assert plain.label == "card_arrival" and not plain.parsed
    probs = normalise_output("It is about a top up that failed and the customer is unhappy", cfg,
                             {"top_up_failed": 0.7, "top_up_reverted": 0.3})
    assert probs.label == "top_up_failed"
    assert normalise_output("A long free-form answer with many words in it", cfg).label is None


def _row(output_raw: str, **kw: object) -> Row:
    return Row(row_id="x:0", input_id="x", input="q", output_raw=output_raw, **kw)  # type: ignore[arg-type]


def _check(filters: dict[str, object], raw: str) -> list[str]:
    cfg = parse_config({"filters": filters})
    rows = [_row(raw)]
    report = process(rows, cfg)
    assert report.filters.rows == 1
    return rows[0].filter_reasons


@pytest.mark.parametrize(
    ("filters", "raw", "code"),
    [
        ({"valid_json": True}, "card_arrival because reasons and more words", "INVALID_JSON"),
        ({"json_schema": {"type": "object", "required": ["category", "explanation"]}}, '{"type": "x"}',
         "SCHEMA_MISMATCH"),
        ({"length": {"min_chars": 50, "max_chars": 100}}, '{"type": "x"}', "TOO_SHORT"),
        ({"length": {"min_chars": 1, "max_chars": 10}}, '{"type": "card_arrival"}', "TOO_LONG"),
        ({"forbidden_phrases": ["as an AI"]}, '{"type": "x", "explanation": "As an ai I think"}', "FORBIDDEN_PHRASE"),
        ({"citation": {"pattern": r"\[\d+\]"}}, '{"type": "x", "explanation": "no source"}', "MISSING_CITATION"),
        ({"allowed_labels": ["card_arrival"]}, '{"type": "pizza"}', "LABEL_NOT_ALLOWED"),
        ({"allowed_labels_file": str(BANKING_LABELS)}, '{"type": "pizza"}', "LABEL_NOT_ALLOWED"),
    ],
)
def test_each_row_filter_emits_its_reason(filters, raw, code):
    assert code in _check(filters, raw)


def test_clean_answer_passes_every_row_filter():
    filters = {"valid_json": True, "json_schema": {"type": "object", "required": ["category"]},
               "length": {"min_chars": 5, "max_chars": 200}, "forbidden_phrases": ["as an ai"],
               "citation": {"pattern": r"\[\d+\]"}, "allowed_labels_file": str(BANKING_LABELS)}
    assert _check(filters, '{"type": "card_arrival", "explanation": "see [1]"}') == []


def test_allowed_labels_are_canonicalised_like_answers():
    # banking77 spells one category "Refund_not_showing_up"; answers are canonicalised to lower case
    assert _check({"allowed_labels_file": str(BANKING_LABELS)}, '{"type": "Refund_not_showing_up"}') == []
    assert _check({"allowed_labels": ["Card Arrival"]}, '{"type": "card-arrival"}') == []


def test_bad_filter_config_is_a_config_error():
    with pytest.raises(ConfigError):
        compile_filters(parse_config({"filters": {"json_schema": {"type": "nope"}}}).filters)
    with pytest.raises(ConfigError):
        compile_filters(parse_config({"filters": {"citation": {"pattern": "("}}}).filters)


def test_duplicates_disagreement_and_per_task_filters(tmp_path):
    records = [
        {"id": "1", "text": "My card has not arrived yet", "answer": teacher_answer("card_arrival")},
        {"id": "2", "text": "my card has NOT arrived yet!", "answer": teacher_answer("card_arrival")},
        {"id": "3", "text": "My card has not arrived yet, please help", "answer": teacher_answer("card_arrival")},
        {"id": "4", "text": "How do I top up by bank transfer?", "answer": "plain text answer that is long enough"},
        {"id": "5", "text": "Exchange rate for euros today", "answer": "another plain answer of several words"},
    ]
    config = {
        "filters": {"valid_json": False},
        "tasks": {"strict": {"filters": {"valid_json": True}}},
        "dedup": {"threshold": 0.7},
    }
    wc = make_dataset(tmp_path, records, config)
    # rows 4 and 5 belong to the strict task
    for row in wc.rows():
        if row.input_id in ("ds-traffic-4",):
            row.task = "strict"
            wc.update_row(row, row.version)
    report = build(wc)
    by_id = {r.input_id: r for r in wc.rows()}
    assert by_id["ds-traffic-1"].filter_reasons == []
    assert by_id["ds-traffic-2"].filter_reasons == ["EXACT_DUPLICATE"]
    assert by_id["ds-traffic-2"].exact_dup_of == "ds-traffic-1"
    assert by_id["ds-traffic-3"].filter_reasons == ["NEAR_DUPLICATE"]
    assert by_id["ds-traffic-3"].dup_cluster == "ds-traffic-1"
    assert by_id["ds-traffic-4"].filter_reasons == ["INVALID_JSON"]
    assert by_id["ds-traffic-5"].filter_reasons == []
    assert report.filters.reasons == {"EXACT_DUPLICATE": 1, "NEAR_DUPLICATE": 1, "INVALID_JSON": 1}
    assert report.filters.reasons_by_label["EXACT_DUPLICATE"] == {"card_arrival": 1}


def test_sample_disagreement_and_decontamination(tmp_path):
    from _data_support import sample

    wc = make_dataset(tmp_path, [], {"decontamination": [{"path": str(tmp_path / "eval.csv"), "column": "q"}]})
    (tmp_path / "eval.csv").write_text("q\nwhat is the exchange rate for euros today\n")
    traffic = tmp_path / "t.jsonl"
    traffic.write_text(
        json.dumps({"id": "a", "text": "I lost my card on the train"}) + "\n"
        + json.dumps({"id": "b", "text": "What is the exchange rate for euros today?"}) + "\n"
    )
    from distillgate.data.config import IngestConfig
    from distillgate.data.ingest import ingest_file

    wc.add_inputs(ingest_file(traffic, IngestConfig.model_validate({"columns": {"record_id": "id"}})).rows)
    pending = wc.pending_generation(k=3)
    assert len(pending) == 6
    answers = {"t-a": ["lost_or_stolen_card", "card_arrival", "card_linking"], "t-b": ["exchange_rate"] * 3}
    wc.append_generated(sample(t.input_id, i, teacher_answer(answers[t.input_id][i])) for t, i in pending)
    build(wc)
    rows = {r.row_id: r for r in wc.rows()}
    assert rows["t-a:0"].agreement == pytest.approx(1 / 3)
    assert "SAMPLE_DISAGREEMENT" in rows["t-a:1"].filter_reasons
    assert rows["t-b:2"].agreement == 1.0
    assert rows["t-b:0"].filter_reasons == ["CONTAMINATED"]


def test_every_reason_code_is_upper_snake():
    assert all(code.isupper() and " " not in code for code in REASONS)
