"""Row schema round trips, traffic ingest (CSV / JSONL / Parquet with column mapping) and config validation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _data_support import BANKING_TRAIN
from distillgate.data.config import ColumnMapping, IngestConfig, parse_config
from distillgate.data.ingest import ingest_file
from distillgate.data.schema import (
    ARROW_SCHEMA,
    FIELD_NAMES,
    SCHEMA_VERSION,
    Row,
    read_parquet,
    write_parquet,
)
from distillgate.errors import ConfigError, NotFoundError, UserError


def _full_row() -> Row:
    return Row(
        row_id="a-1:0", input_id="a-1", input="Where is my card?", output_raw='{"type": "card_arrival"}',
        output='{"category":"card_arrival"}', teacher_label="card_arrival", label="card_arrival",
        label_probs={"card_arrival": 0.9, "card_linking": 0.1},
        top_logprobs=[[{"token": "card", "logprob": -0.1}, {"token": "lost", "logprob": -2.3}]],
        teacher_model="m", teacher_card={"model_id": "m", "parameter_count": 1}, prompt_template_id="p",
        prompt_template_sha256="00", sampling={"temperature": 0.0}, stamp={"sig": "x"}, source_file="f.csv",
        source_record_id="1", source_group="acct-1", source_timestamp="2024-01-01T00:00:00Z", tags=["x"],
        filter_status="pass", filter_reasons=[], dup_cluster="a-1", agreement=1.0, split="train", edited=True,
        review_after={"label": "card_arrival"}, version=3,
    )


def test_parquet_round_trip_keeps_every_field(tmp_path):
    row = _full_row()
    write_parquet([row], tmp_path / "rows.parquet")
    table = pq.read_table(tmp_path / "rows.parquet")
    assert table.schema.metadata[b"distillgate.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table.column_names == list(FIELD_NAMES)
    (back,) = read_parquet(tmp_path / "rows.parquet")
    assert back == row
    assert back.label_probs == {"card_arrival": 0.9, "card_linking": 0.1}
    assert back.top_logprobs[0][1] == {"token": "lost", "logprob": -2.3}


def test_other_schema_version_is_refused(tmp_path):
    table = pa.table({"row_id": ["x"]}, schema=pa.schema([pa.field("row_id", pa.string())],
                                                            metadata={b"distillgate.schema_version": b"999"}))
    pq.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(UserError, match="schema version 999"):
        read_parquet(tmp_path / "rows.parquet")


def test_unknown_record_field_is_refused():
    with pytest.raises(UserError, match="unknown field"):
        Row.from_record({**_full_row().to_record(), "surprise": 1})


def test_content_hash_ignores_edit_counter_only():
    a, b = _full_row(), _full_row()
    b.version = 9
    assert a.content_sha256() == b.content_sha256()
    b.label = "card_linking"
    assert a.content_sha256() != b.content_sha256()
    assert ARROW_SCHEMA.field("edited").type == pa.bool_()


def test_ingest_csv_banking77_with_mapping():
    cfg = IngestConfig(columns=ColumnMapping(input="text", reference_label="category"))
    result = ingest_file(BANKING_TRAIN, cfg)
    assert len(result.rows) == 10003
    first = result.rows[0]
    assert first.input == "I am still waiting on my card?"
    assert first.reference_label == "card_arrival"
    assert first.input_id == "train-0" and first.row_id == "train-0:0"
    assert first.source_file == "train.csv" and first.output_raw is None
    assert len(first.input_sha256) == 64


def test_ingest_jsonl_and_parquet_agree(tmp_path):
    records = [
        {"rid": "r1", "msg": "hello there", "acct": "A", "when": "2024-05-01T10:00:00Z", "kind": "adversarial,x"},
        {"rid": "r2", "msg": "   ", "acct": "A", "when": "2024-05-02T10:00:00Z", "kind": ""},
        {"rid": "r3", "msg": "card lost", "acct": "B", "when": "2024-05-03T10:00:00Z", "kind": ""},
    ]
    import json

    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet")
    cfg = IngestConfig(columns=ColumnMapping(input="msg", record_id="rid", group="acct", timestamp="when",
                                             tags="kind"))
    from_jsonl = ingest_file(tmp_path / "t.jsonl", cfg)
    from_parquet = ingest_file(tmp_path / "t.parquet", cfg)
    assert from_jsonl.skipped_empty == 1
    assert [r.input for r in from_jsonl.rows] == [r.input for r in from_parquet.rows] == ["hello there", "card lost"]
    assert from_jsonl.rows[0].tags == ["adversarial", "x"]
    assert from_jsonl.rows[1].source_group == "B" and from_jsonl.rows[1].input_id == "t-r3"


def test_ingest_errors_say_how_to_fix(tmp_path):
    with pytest.raises(NotFoundError):
        ingest_file(tmp_path / "missing.csv")
    (tmp_path / "t.csv").write_text("body\nhello\n")
    with pytest.raises(UserError, match="no column 'text'") as info:
        ingest_file(tmp_path / "t.csv")
    assert "--map" in str(info.value)
    (tmp_path / "d.csv").write_text("id,text\n1,a\n1,b\n")
    with pytest.raises(UserError, match="appears twice"):
        ingest_file(tmp_path / "d.csv", IngestConfig(columns=ColumnMapping(record_id="id")))
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(UserError, match="--format"):
        ingest_file(tmp_path / "t.txt")


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config({
            "filters": {"lenght": {"min_chars": 1}, "disagreement": {"min_agreement": 3}},
            "dedup": {"num_perm": 100, "bands": 32},
            "split": {"ratios": {"train": 0.5, "dev": 0.5}},
            "colour": "blue",
        })
    text = str(info.value)
    assert len(info.value.issues) == 5, text
    for fragment in ("filters.lenght", "filters.disagreement.min_agreement", "multiple of bands", "dev", "colour"):
        assert fragment in text
    assert "remove it" in text


def test_per_task_filters_override_defaults():
    cfg = parse_config({"filters": {"valid_json": False}, "tasks": {"intent": {"filters": {"valid_json": True}}}})
    assert cfg.filters_for("intent").valid_json is True
    assert cfg.filters_for("other").valid_json is False
