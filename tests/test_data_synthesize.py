"""Synthetic data: written through the gateway (synthetic_records), labelled in a separate governed call, train only.

The mechanism runs against two fake teachers behind a real gateway (tests/_synth_support.py); the split and share
rules run on rows built by hand, including hostile ones (a synthetic row whose text is a test row's).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from _synth_support import (
    CONFIG,
    LABEL_TEMPLATE,
    LABELS,
    banking_texts,
    label_settings,
    seed_row,
    seeded_copy,
    two_teachers,
)
from distillgate.data.config import parse_config
from distillgate.data.pipeline import build, process
from distillgate.data.schema import Row, make_row_id, read_parquet, text_sha256
from distillgate.data.store import WorkingCopy
from distillgate.data.synthesize import (
    TEMPLATES,
    balance_targets,
    discard_synthetic,
    parse_synthesize_config,
    plan_tasks,
    synthesize,
    train_seeds,
    transform_text,
)
from distillgate.data.versions import freeze
from distillgate.errors import ConfigError, DatasetGuardError, SyntheticShareError, UserError
from distillgate.gateway.stamps import Stamp

PLAN = {"model": "fake-teacher-large", "hard_negatives": 3, "out_of_scope": 2, "adversarial": 2,
        "out_of_scope_label": "card_arrival",
        "edge_cases": {"transforms": ["short", "misspelt", "formatting"], "per_transform": 1, "written": 1},
        "balance": {"target": "uniform", "max_new": 2}}


def _synthetic(wc: WorkingCopy) -> list[Row]:
    return [r for r in wc.inputs() if r.synthetic is not None]


def test_synthesize_writes_through_the_gateway_and_labels_in_a_separate_call(tmp_path: Path) -> None:
    root = seeded_copy(tmp_path / "ds")
    cfg = parse_synthesize_config(PLAN)
    with two_teachers(tmp_path) as gw, WorkingCopy.open(root) as wc:
        train = {r.row_id for r in train_seeds(wc)}
        report = synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=label_settings(),
                            target=gw.target)
        pem = gw.gateway.store.signer.public_key_pem()
        log = {e["index"]: e for e in gw.log()}
        inputs = _synthetic(wc)
        rows = {r.input_id: r for r in wc.rows()}
        written_calls = len(gw.writer.requests)
    assert not report.stopped and report.failed == 0 and report.empty == 0
    assert report.planned == {"hard_negative": 3, "edge_case": 4, "out_of_scope": 2, "adversarial": 2,
                              "balance": 2}
    assert report.added == report.planned
    assert written_calls == 3 + 1 + 2 + 2 + 2  # transforms make no call
    assert len(inputs) == 13
    for inp in inputs:
        syn = inp.synthetic
        assert syn is not None and inp.source_file == "synthetic" and "synthetic" in inp.tags
        assert set(syn["seed_row_ids"]) <= train, "seeds are real rows the build puts in train"
        row = rows[inp.input_id]  # the teacher labelled it: a row of its own
        assert row.synthetic == syn and row.output_raw == "card_lost"
        label_stamp = Stamp.from_dict(row.stamp or {})
        assert label_stamp.verify(pem)
        assert log[label_stamp.payload["entry_index"]]["output_type"] == "labels"
        if syn["transform"] is not None:  # a deterministic transform: recorded as such, no generator call
            assert syn["template_id"] == f"transform:{syn['transform']}" and syn["stamp"] is None
            continue
        kind = syn["kind"]
        assert syn["template_id"] == TEMPLATES[kind].id and syn["template_sha256"] == TEMPLATES[kind].sha256
        gen_stamp = Stamp.from_dict(syn["stamp"])
        assert gen_stamp.verify(pem) and gen_stamp.payload["model"] == "fake-teacher-large"
        assert log[gen_stamp.payload["entry_index"]]["output_type"] == "synthetic_records"
        assert gen_stamp.payload["entry_index"] != label_stamp.payload["entry_index"]  # two governed calls
        assert inp.input.startswith("Echo: ")  # the writer saw the seed message first
    oos = [i for i in inputs if i.synthetic and i.synthetic["kind"] == "out_of_scope"]
    assert {i.synthetic["intended_label"] for i in oos if i.synthetic} == {"card_arrival"}


def test_rerun_asks_for_nothing_new(tmp_path: Path) -> None:
    root = seeded_copy(tmp_path / "ds")
    cfg = parse_synthesize_config(PLAN)
    with two_teachers(tmp_path) as gw, WorkingCopy.open(root) as wc:
        synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=label_settings(), target=gw.target)
        asked = (len(gw.writer.requests), len(gw.labeller.requests))
        again = synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=label_settings(), target=gw.target)
        assert (len(gw.writer.requests), len(gw.labeller.requests)) == asked
        assert again.already_present == 13 and again.added == {}
        assert discard_synthetic(wc, ["balance"]) == 2
        assert not [r for r in wc.rows() if r.synthetic and r.synthetic["kind"] == "balance"]
        refilled = synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=label_settings(),
                              target=gw.target)
        assert refilled.added == {"balance": 2}


def test_synthetic_rows_go_through_filters_and_dedup_against_real_rows(tmp_path: Path) -> None:
    """A writer that copies a real message (or nearly): the build's dedup filters the copies, real rows win."""
    root = seeded_copy(tmp_path / "ds")
    real = banking_texts(3)
    cfg = parse_synthesize_config({"model": "fake-teacher-large", "adversarial": 2, "balance": {"max_new": 1}})
    with two_teachers(tmp_path) as gw, WorkingCopy.open(root) as wc:
        gw.writer.set_reply(real[1] + " please")  # every written message: a near-copy of real row 1
        synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=label_settings(), target=gw.target)
        report = build(wc)
        rows = [r for r in wc.rows() if r.synthetic is not None]
        real_row = next(r for r in wc.rows() if r.input == real[1])
    assert len(rows) == 3
    assert all(r.split == "excluded" and r.filter_reasons for r in rows)
    assert real_row.filter_status == "pass" and not real_row.filter_reasons  # the real row is the keeper
    dup_reasons = {code for r in rows for code in r.filter_reasons}
    assert dup_reasons <= {"EXACT_DUPLICATE", "NEAR_DUPLICATE"} and "NEAR_DUPLICATE" in dup_reasons
    assert report.synthetic["by_split"]["excluded"]["synthetic"] == 3
    assert "train" not in report.synthetic["by_split"] or report.synthetic["by_split"]["train"]["synthetic"] == 0


def test_share_cap_is_checked_before_any_call(tmp_path: Path) -> None:
    root = seeded_copy(tmp_path / "ds", config={**CONFIG, "synthetic": {"max_train_share": 0.1}})
    cfg = parse_synthesize_config({**PLAN, "balance": {"max_new": 20}})
    with two_teachers(tmp_path) as gw, WorkingCopy.open(root) as wc:
        with pytest.raises(SyntheticShareError, match="max_train_share") as err:
            synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=label_settings(), target=gw.target)
        assert "nothing was asked" in str(err.value)
        assert gw.writer.requests == [] and gw.labeller.requests == []
        assert _synthetic(wc) == []


def test_a_denial_stops_the_writer_and_keeps_what_was_written(tmp_path: Path) -> None:
    from _synth_support import POLICY

    policy = {**POLICY, "allowed_outputs": ["labels"]}  # synthetic_records not allowed
    root = seeded_copy(tmp_path / "ds")
    cfg = parse_synthesize_config(PLAN)
    with two_teachers(tmp_path, policy) as gw, WorkingCopy.open(root) as wc:
        report = synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=label_settings(),
                            target=gw.target)
        assert report.stopped and "OUTPUT_TYPE_NOT_ALLOWED" in report.stopped_by
        assert gw.writer.requests == []  # denied at the gateway: the teacher never saw a request
        kinds = Counter(r.synthetic["kind"] for r in _synthetic(wc) if r.synthetic)
        assert kinds == {"edge_case": 3}  # the deterministic transforms, which need no call
        assert gw.labeller.requests == []  # a stopped job does not label


# -- planning ---------------------------------------------------------------------------------------------------
def test_hard_negatives_use_the_second_most_probable_label_smallest_margin_first() -> None:
    seeds = [seed_row(0, "a", "card_lost", {"card_lost": 0.5, "top_up_failed": 0.45, "card_arrival": 0.05}),
             seed_row(1, "b", "card_lost", {"card_lost": 0.9, "card_arrival": 0.08, "top_up_failed": 0.02}),
             seed_row(2, "c", "top_up_failed", None)]
    for s in seeds:
        s.label = s.output_raw
    tasks, _ = plan_tasks(seeds, parse_synthesize_config({"hard_negatives": 3}), LABELS)
    assert [(t.seeds[0].row_id, t.intended_label) for t in tasks] == [
        ("real-000:0", "top_up_failed"), ("real-001:0", "card_arrival"), ("real-000:0", "top_up_failed")]
    assert 'means "card_lost"' in tasks[0].messages[-1]["content"]
    assert 'means "top_up_failed"' in tasks[0].messages[-1]["content"]
    assert len({t.input_id for t in tasks}) == 3  # each task its own input id
    with pytest.raises(UserError, match="label distributions"):
        plan_tasks(seeds[2:], parse_synthesize_config({"hard_negatives": 1}), LABELS)


def test_balance_fills_under_represented_labels_up_to_the_target() -> None:
    counts = Counter({"a": 5, "b": 2, "c": 1})
    assert balance_targets(counts, ["a", "b", "c", "d"], "uniform", 100) == {"b": 3, "c": 4}
    assert balance_targets(counts, ["a", "b", "c"], "uniform", 3) == {"c": 2, "b": 1}  # largest deficit first
    # a target distribution: a's 5 rows are its 50 %, so the whole is 10: b wants 3 (30 %), c wants 2 (20 %)
    assert balance_targets(counts, ["a", "b", "c"], {"a": 0.5, "b": 0.3, "c": 0.2}, 100) == {"b": 1, "c": 1}


def test_transforms_are_deterministic_edge_cases() -> None:
    text = "Why has my card not arrived yet after two weeks"
    rng = lambda: random.Random("s")  # noqa: E731
    assert transform_text("empty", text, rng()) == ""
    assert transform_text("short", text, rng()) == "Why has"
    assert transform_text("long", text, rng(), ["it is late", "still nothing"]).endswith("still nothing")
    misspelt = transform_text("misspelt", text, rng())
    assert misspelt == transform_text("misspelt", text, rng()) and misspelt != text
    assert len(misspelt.split()) == len(text.split())
    mixed = transform_text("mixed_language", text, rng())
    assert mixed != text and ("tarjeta" in mixed or "mi" in mixed.split())
    assert transform_text("formatting", text, rng()) != text
    with pytest.raises(UserError, match="unknown edge-case transform"):
        transform_text("rot13", text, rng())


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError) as err:
        parse_synthesize_config({"hard_negatives": -1, "edge_cases": {"transforms": ["rot13"]}, "surprise": 1})
    paths = {i.path for i in err.value.issues}
    assert {"hard_negatives", "surprise"} <= paths and any(p.startswith("edge_cases.transforms") for p in paths)


# -- the split rules --------------------------------------------------------------------------------------------
def _synthetic_row(i: int, text: str, label: str = "card_lost", prefix: str = "syn-test") -> Row:
    iid = f"{prefix}-{i:03d}"
    return Row(row_id=make_row_id(iid, 0), input_id=iid, input=text, output_raw=label, teacher_model="imported",
               source_file="synthetic", input_sha256=text_sha256(text), tags=["synthetic"],
               synthetic={"kind": "balance", "template_id": "synth.balance.v1", "template_sha256": "x",
                          "seed_row_ids": ["real-000:0"], "stamp": None, "transform": None, "style": None,
                          "intended_label": label})


def _real_rows(n: int) -> list[Row]:
    return [seed_row(i, text, LABELS[i % 3]) for i, text in enumerate(banking_texts(n))]


def test_synthetic_rows_never_enter_val_test_golden_or_holdout() -> None:
    config = parse_config({**CONFIG, "split": {**CONFIG["split"], "golden": {"fraction": 0.2},
                                               "holdout": {"enabled": True, "rare_label_max_count": 0}},
                           "synthetic": {"max_train_share": 1.0}})
    real = _real_rows(60)
    synthetic = [_synthetic_row(i, t) for i, t in enumerate(banking_texts(60, offset=500))]
    rows = real + synthetic
    process(rows, config)
    live = [r for r in rows if r.synthetic and r.filter_status == "pass"]
    assert len(live) >= 55  # (one is a near-duplicate of another: filtered)
    assert {r.split for r in live} == {"train"}  # without the rule about 40 % would land in val/test/golden
    assert {r.split for r in real} >= {"train", "val", "test", "golden"}


def test_hostile_synthetic_copy_of_a_test_row_is_held_out_not_trained() -> None:
    """A synthetic row whose text equals a test row's (dedup filters off, so only the split rule stands)."""
    config = parse_config({**CONFIG, "filters": {"exact_duplicates": False, "near_duplicates": False}})
    real = _real_rows(40)
    process(real, config)
    test_rows = [r for r in real if r.split == "test"]
    val_rows = [r for r in real if r.split == "val"]
    assert test_rows and val_rows
    # ids that sort before every real id: were they a component's key, the component could be drawn again
    hostile = [_synthetic_row(0, test_rows[0].input, prefix="000"),
               _synthetic_row(1, test_rows[1].input.upper() + "!", prefix="000"),
               _synthetic_row(2, val_rows[0].input, prefix="000")]
    rows = _real_rows(40) + hostile
    process(rows, config)
    assert [(r.split, r.split_reason) for r in rows[-3:]] == [("excluded", "synthetic_held_out")] * 3
    # the real rows keep their splits: a synthetic row never keys a component
    assert [r.split for r in rows[:40]] == [r.split for r in real]


def test_a_golden_lock_naming_a_synthetic_row_does_not_make_it_golden() -> None:
    config = parse_config(CONFIG)
    syn = _synthetic_row(0, "a wholly synthetic message about something")
    rows = [*_real_rows(10), syn]
    process(rows, config, golden_lock={syn.row_id: syn.golden_sha256(), "real-000:0": "x"})
    assert (rows[-1].split, rows[-1].split_reason) == ("excluded", "synthetic_held_out")


def test_synthetic_rows_do_not_change_real_splits() -> None:
    config = parse_config({**CONFIG, "split": {**CONFIG["split"], "holdout": {"enabled": True}}})
    alone = _real_rows(50)
    process(alone, config)
    mixed = _real_rows(50) + [_synthetic_row(i, t) for i, t in enumerate(banking_texts(30, offset=900))]
    process(mixed, config)
    assert [(r.split, r.split_reason) for r in mixed[:50]] == [(r.split, r.split_reason) for r in alone]


def test_build_refuses_more_synthetic_train_rows_than_the_cap_and_writes_nothing(tmp_path: Path) -> None:
    real = _real_rows(20)
    synthetic = [_synthetic_row(i, t) for i, t in enumerate(banking_texts(20, offset=300))]
    with WorkingCopy.create(tmp_path / "ds", CONFIG) as wc:  # default cap: 0.5
        wc.add_inputs(real + synthetic)
        with pytest.raises(SyntheticShareError, match=r"synthetic.max_train_share \(50%\)") as err:
            build(wc)
        assert "nothing was written" in str(err.value) and "at most" in (err.value.hint or "")
        assert {r.filter_status for r in wc.rows()} == {"pending"}
        discard = [r.input_id for r in synthetic[:12]]
        wc.discard_inputs(discard)
        report = build(wc)
        train = report.synthetic["by_split"]["train"]
        assert train["synthetic"] == 8 and train["synthetic"] <= train["real"]
        assert report.synthetic["train_share"] <= 0.5


def test_freeze_refuses_a_synthetic_row_moved_to_test_by_hand(tmp_path: Path) -> None:
    real = _real_rows(20)
    with WorkingCopy.create(tmp_path / "ds", CONFIG) as wc:
        wc.add_inputs([*real, _synthetic_row(0, "a wholly synthetic message about something")])
        build(wc)
        row = next(r for r in wc.rows() if r.synthetic)
        assert row.split == "train"
        row.split = "test"
        wc.update_row(row, row.version)
        with pytest.raises(DatasetGuardError, match="outside the train split"):
            freeze(wc)
        build(wc)  # the build puts it back
        version = freeze(wc)
    frozen: list[Any] = read_parquet(version.path / "rows.parquet")
    assert [r.split for r in frozen if r.synthetic] == ["train"]


# -- the command ------------------------------------------------------------------------------------------------
def test_cli_synthesizes_against_a_running_gateway_then_discards(tmp_path: Path) -> None:
    import json

    import yaml
    from click.testing import CliRunner

    from distillgate.cli.main import cli

    root = seeded_copy(tmp_path / "ds")
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(PLAN))
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    with two_teachers(tmp_path) as gw:
        args = ["dataset", "synthesize", str(root), "--plan", str(tmp_path / "plan.yaml"), "--set", "adversarial=0",
                "--template", LABEL_TEMPLATE.user, "--system", str(LABEL_TEMPLATE.system), "--template-id",
                LABEL_TEMPLATE.id, "--labels-file", str(tmp_path / "labels.json"), "--model", "fake-teacher",
                "--max-tokens", "8", "--project", "proj-a", "--user", "alice", "--run", "syn-1",
                "--gateway", gw.target.base_url, "--api-key", gw.target.api_key, "--json"]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["added"] == {"hard_negative": 3, "edge_case": 4, "out_of_scope": 2, "balance": 2}
        assert report["labelled"]["added"] == 11
        no_template = CliRunner().invoke(cli, [*args[:5], "--gateway", gw.target.base_url])
        assert isinstance(no_template.exception, UserError) and "--template" in str(no_template.exception)
    gone = CliRunner().invoke(cli, ["dataset", "synthesize", str(root), "--discard", "all"])
    assert gone.exit_code == 0 and "discarded 11 synthetic input(s)" in gone.output
    with WorkingCopy.open(root) as wc:
        assert not [r for r in wc.rows() if r.synthetic is not None] and len(wc.inputs()) == 30


def test_review_queue_holds_synthetic_rows_labelled_otherwise_than_written_for(tmp_path: Path) -> None:
    from distillgate.data.review import queue_rows, queue_sizes

    root = seeded_copy(tmp_path / "ds")
    cfg = parse_synthesize_config({"model": "fake-teacher-large", "hard_negatives": 4,
                                   "edge_cases": {"transforms": ["formatting"], "per_transform": 3}})
    with two_teachers(tmp_path) as gw, WorkingCopy.open(root) as wc:
        synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=label_settings(), target=gw.target)
        build(wc)
        queued = queue_rows(wc, "synthetic")
        synthetic = [r for r in wc.rows() if r.synthetic is not None]
        sizes = queue_sizes(wc)
    # the labeller answers card_lost to everything: the queue is every synthetic row written for another label
    expected = {r.row_id for r in synthetic if r.synthetic and r.synthetic["intended_label"] != "card_lost"}
    assert expected and {r.row_id for r in queued} == expected and sizes["synthetic"] == len(expected)


def test_schema_version_1_files_still_read_and_real_rows_hash_as_before(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from distillgate.data.schema import rows_to_table

    row = seed_row(0, "Where is my card?", "card_arrival")
    table = rows_to_table([row]).drop_columns(["synthetic"])
    table = table.replace_schema_metadata({b"distillgate.schema_version": b"1"})
    pq.write_table(table, tmp_path / "v1.parquet")
    back = read_parquet(tmp_path / "v1.parquet")[0]
    assert back.synthetic is None and back.input == row.input
    # a null ``synthetic`` is left out of the content hash: what version 1 hashed
    import hashlib

    import orjson

    record = row.to_record()
    record.pop("version")
    record.pop("synthetic")
    assert row.content_sha256() == hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()
    marked = _synthetic_row(0, "Where is my card?")
    assert marked.content_sha256() != Row.from_record({**marked.to_record(), "synthetic": None}).content_sha256()


def test_generator_answers_are_cleaned_to_the_message() -> None:
    from distillgate.data.synthesize import clean_generated

    assert clean_generated('Here is a new message:\n"Where is my new card?"\nI hope this helps.') == \
        "Where is my new card?"
    assert clean_generated("<think>they want a message</think>Message: My top-up failed") == "My top-up failed"
    assert clean_generated("   \n") == "" and clean_generated(None) == ""
    assert clean_generated("Regular message:") == "Regular message:"  # nothing after the header: kept as is


def test_a_transform_of_the_same_seed_is_planned_once() -> None:
    seeds = [seed_row(i, t, "card_lost") for i, t in enumerate(banking_texts(2))]
    for s in seeds:
        s.label = s.output_raw
    tasks, notes = plan_tasks(seeds, parse_synthesize_config({"edge_cases": {"transforms": ["short"],
                                                                             "per_transform": 5}}), LABELS)
    assert len(tasks) == 2 and len({t.input_id for t in tasks}) == 2
    assert any("repeat another" in n for n in notes)
