"""Refusal detectors: the string baseline, the MiniLM classifier, agreement with hand labels, the CLI."""

from __future__ import annotations

import csv

import pytest

from distillgate.evals.refusal import (
    REFUSAL_DIR,
    EmbeddingDetector,
    StringMatchDetector,
    agreement,
    read_labelled,
)

from conftest import run_cli


def test_string_baseline_kinds():
    det = StringMatchDetector()
    assert det.classify([
        "I'm sorry, but I can't help with that.",
        "The context does not mention the author's name.",
        "To kill a Python process, run kill PID.",
        "Based on the provided text, I cannot determine the date.",
    ]) == ["safety", "context", "comply", "context"]


def test_agreement_statistics_hand_values():
    class Fixed:
        name = "fixed"

        def classify(self, texts):
            return ["comply", "safety", "safety", "context"]

    result = agreement(Fixed(), ["a", "b", "c", "d"], ["comply", "safety", "comply", "context"])
    assert result.accuracy == 0.75
    assert result.refused_agreement == 0.75
    # kappa: p_o = 3/4; marginals gold (2,1,1), pred (1,2,1) -> p_e = (2*1 + 1*2 + 1*1) / 16 = 5/16
    assert result.cohen_kappa == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))
    assert result.confusion["comply"]["safety"] == 1


def test_training_and_heldout_sets_are_disjoint_and_labelled():
    train, train_kinds = read_labelled(REFUSAL_DIR / "train.csv")
    held, held_kinds = read_labelled(REFUSAL_DIR / "heldout.csv")
    assert not {t.strip().lower() for t in train} & {t.strip().lower() for t in held}
    assert set(train_kinds) == set(held_kinds) == {"comply", "safety", "context"}
    assert len(train) >= 120 and len(held) >= 80


@pytest.fixture(scope="module")
def embedding_detector():
    return EmbeddingDetector()


def test_embedding_detector_beats_the_string_baseline_on_hand_labels(embedding_detector):
    texts, gold = read_labelled(REFUSAL_DIR / "heldout.csv")
    emb = agreement(embedding_detector, texts, gold)
    base = agreement(StringMatchDetector(), texts, gold)
    assert emb.accuracy >= 0.85 and emb.cohen_kappa >= 0.7
    assert emb.accuracy > base.accuracy and emb.cohen_kappa > base.cohen_kappa
    probs = embedding_detector.probabilities(["I'm sorry, but I won't help you build a weapon."])
    assert sum(probs[0].values()) == pytest.approx(1.0) and max(probs[0], key=probs[0].get) == "safety"


def test_cli_classify_writes_refused_column(tmp_path):
    path = tmp_path / "answers.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "response"])
        w.writerow(["1", "I'm sorry, but I can't assist with that request."])
        w.writerow(["2", "Sure! Here is a recipe for pancakes: flour, milk, eggs."])
        w.writerow(["3", "The passage does not say when the shop opens."])
    proc = run_cli("refusal", "classify", str(path), "--column", "response", "--detector", "string")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(path.open()))
    assert [r["refused"] for r in rows] == ["1", "0", "0"]
    assert [r["refusal_kind"] for r in rows] == ["safety", "comply", "context"]
    assert rows[0]["response"].startswith("I'm sorry")
    bad = run_cli("refusal", "classify", str(path), "--column", "nope", "--detector", "string")
    assert bad.returncode == 1 and "choose one of: id, response" in bad.stderr
