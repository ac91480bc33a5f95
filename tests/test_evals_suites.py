"""Suites: items, sampling, label parsing and slices from dataset-version exports."""

from __future__ import annotations

import json

import pytest

from distillgate.errors import NotFoundError, UserError
from distillgate.evals.suites import (
    length_bucket,
    load_banking77,
    load_dataset_items,
    load_xstest,
    parse_label,
)

LABELS = ["card_arrival", "card_linking", "exchange_rate", "top_up_failed", "top_up_failed_twice"]


@pytest.mark.parametrize(("raw", "expected"), [
    ("card_arrival", "card_arrival"),
    ("  Card Arrival. ", "card_arrival"),
    ('{"label": "exchange_rate"}', "exchange_rate"),
    ('```json\n{"intent": "card linking"}\n```', "card_linking"),
    ("The intent is exchange_rate, I think.", "exchange_rate"),
    ("top_up_failed_twice", "top_up_failed_twice"),
    ("It is top up failed twice", "top_up_failed_twice"),
    ("no idea", None),
    ("", None),
])
def test_parse_label(raw, expected):
    assert parse_label(raw, LABELS) == expected


def test_banking77_sample_is_fixed_by_seed():
    a = load_banking77(sample=40, seed=9)
    b = load_banking77(sample=40, seed=9)
    c = load_banking77(sample=40, seed=10)
    assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
    assert [i.item_id for i in a.items] != [i.item_id for i in c.items]
    assert len(a.labels) == 77 and a.meta["population"] == 3080
    assert {"label", "source", "length"} <= set(a.items[0].slices)
    with pytest.raises(UserError, match="positive"):
        load_banking77(sample=0)


def test_xstest_has_safe_and_unsafe_items():
    suite = load_xstest()
    golds = [i.gold for i in suite.items]
    assert golds.count("safe") == 250 and golds.count("unsafe") == 200
    assert suite.kind == "refusal" and suite.messages(suite.items[0]) == [
        {"role": "user", "content": suite.items[0].text}]


def test_dataset_export_gives_golden_and_holdout_slices(tmp_path):
    rows = [
        {"row_id": "r1", "input": "where is my card", "label": "card_arrival", "source": "crm", "split": "test",
         "golden": True},
        {"row_id": "r2", "input": "rate for euros", "label": "exchange_rate", "source": "chat", "split": "holdout",
         "golden": False},
        {"row_id": "r3", "input": "top up broke", "label": "top_up_failed", "source": "chat", "split": "train",
         "golden": False},
    ]
    path = tmp_path / "v1.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    suite = load_dataset_items(path)
    assert [i.item_id for i in suite.items] == ["r1", "r2", "r3"]
    assert suite.items[0].slices["golden"] == "golden"
    assert suite.items[1].slices["holdout"] == "hard-case holdout"
    assert suite.items[2].slices["holdout"] == "not holdout"
    assert suite.items[1].slices["source"] == "chat"
    assert suite.labels == ["card_arrival", "exchange_rate", "top_up_failed"]
    only_test = load_dataset_items(path, split="test")
    assert [i.item_id for i in only_test.items] == ["r1"]
    with pytest.raises(UserError, match="split='nope'"):
        load_dataset_items(path, split="nope")
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(UserError, match="text column"):
        load_dataset_items(bad)
    with pytest.raises(NotFoundError):
        load_dataset_items(tmp_path / "none.csv")


def test_length_buckets():
    assert length_bucket("one two") == "short (<=8 words)"
    assert length_bucket(" ".join(["w"] * 12)) == "medium (9-20 words)"
    assert length_bucket(" ".join(["w"] * 21)) == "long (>20 words)"
