"""Item-paired statistics against hand-computed values and the known cases of issue 7."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import f1_score

from distillgate.errors import UserError
from distillgate.evals.answers import Answer
from distillgate.evals.retention import retention_by_slice
from distillgate.evals.stats import (
    accuracy,
    agreement,
    encode,
    flips,
    is_valid_json,
    macro_f1,
    paired_bootstrap,
    paired_mean_bootstrap,
    resample_indices,
)
from distillgate.evals.suites import load_banking77


def answers_for(items, labels, role, model="m"):
    return [Answer(it.item_id, role, model, lab or "", lab, None, None, 0.1, 3, 1)
            for it, lab in zip(items, labels, strict=True)]


def test_accuracy_and_agreement_hand_values():
    vocab: dict[str, int] = {}
    gold = encode(["a", "b", "c", "a"], vocab)
    pred = encode(["a", "b", None, "b"], vocab)
    other = encode(["a", "c", None, "b"], vocab)
    assert accuracy(pred, gold) == 0.5
    # an unparsed answer (-1) never agrees, even with another unparsed answer
    assert agreement(pred, other) == 0.5
    assert agreement(pred, pred) == 0.75


def test_macro_f1_hand_example():
    # gold a a b b, pred a b b b: a: P=1 R=.5 F=2/3; b: P=2/3 R=1 F=.8; macro = (2/3 + .8) / 2
    vocab: dict[str, int] = {}
    gold = encode(list("aabb"), vocab)
    pred = encode(list("abbb"), vocab)
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 0.8) / 2)


def test_macro_f1_matches_scikit_learn_on_random_labels():
    rng = np.random.default_rng(3)
    for _ in range(20):
        gold = rng.integers(0, 6, size=50)
        pred = rng.integers(0, 7, size=50)  # includes a label gold never has
        ours = macro_f1(pred.astype(np.int64), gold.astype(np.int64))
        assert ours == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))


def test_unparsed_prediction_is_a_false_negative_only():
    vocab: dict[str, int] = {}
    gold = encode(["a", "b"], vocab)
    pred = encode(["a", None], vocab)
    # a: F=1; b: TP=0 FN=1 -> F=0; the unparsed answer adds no label of its own
    assert macro_f1(pred, gold) == pytest.approx(0.5)


def test_json_validity():
    assert is_valid_json('{"label": "card_arrival"}')
    assert is_valid_json('```json\n{"label": "x"}\n```')
    assert not is_valid_json("card_arrival")
    assert not is_valid_json('"just a string"')
    assert not is_valid_json('{"label": ')


def test_identical_models_have_retention_one_with_a_degenerate_interval():
    rng = np.random.default_rng(0)
    scores = (rng.random(200) < 0.6).astype(np.float64)
    teacher, student, diff, retention = paired_mean_bootstrap(scores, scores.copy(), resamples=500)
    assert retention.estimate == 1.0 and retention.low == 1.0 and retention.high == 1.0
    assert diff.estimate == 0.0 and diff.low == 0.0 and diff.high == 0.0
    assert teacher.estimate == student.estimate == pytest.approx(scores.mean())
    assert teacher.low < teacher.estimate < teacher.high  # the per-model CI itself is not degenerate


def test_identical_models_through_the_retention_table():
    suite = load_banking77(sample=60, seed=5)
    rng = np.random.default_rng(1)
    labels = [it.gold if rng.random() < 0.7 else suite.labels[0] for it in suite.items]
    rows = retention_by_slice(suite.items, answers_for(suite.items, labels, "teacher"),
                              answers_for(suite.items, labels, "student"), resamples=300)
    for row in rows:
        for comp in row.comparisons:
            if comp.metric == "accuracy" and comp.teacher.estimate > 0:
                assert comp.retention.estimate == 1.0
                if not math.isnan(comp.retention.low):
                    assert comp.retention.low == comp.retention.high == 1.0
        assert row.agreement.estimate == 1.0  # every answer is parsed, and both models give the same one
    overall = rows[0].get("macro_f1")
    assert overall is not None and overall.retention.estimate == 1.0
    assert overall.retention.low == overall.retention.high == 1.0


def test_majority_label_student_gets_exactly_the_majority_share():
    suite = load_banking77(sample=150, seed=2)
    golds = [it.gold for it in suite.items]
    majority, count = Counter(golds).most_common(1)[0]
    n = len(golds)
    teacher = answers_for(suite.items, golds, "teacher")  # a perfect teacher
    student = answers_for(suite.items, [majority] * n, "student")
    rows = retention_by_slice(suite.items, teacher, student, resamples=300)
    acc = rows[0].get("accuracy")
    assert acc is not None
    assert acc.student.estimate == count / n
    assert acc.teacher.estimate == 1.0
    assert acc.retention.estimate == count / n
    assert acc.difference.estimate == count / n - 1
    # macro-F1 of a constant predictor: F1 of the majority label only, averaged over every gold label
    labels_present = len(set(golds))
    f1_majority = 2 * count / (count + n)
    f1 = rows[0].get("macro_f1")
    assert f1 is not None and f1.student.estimate == pytest.approx(f1_majority / labels_present)
    # per-label slice: the student is right on every item of the majority label and nowhere else
    by_label = {r.value: r for r in rows if r.slice == "label"}
    assert by_label[majority].get("accuracy").student.estimate == 1.0  # type: ignore[union-attr]
    other = next(v for v in by_label if v != majority)
    assert by_label[other].get("accuracy").student.estimate == 0.0  # type: ignore[union-attr]


def test_bootstrap_matches_the_exact_resampling_distribution():
    # Three items, teacher right on items 0 and 1, student only on item 0: per-item difference d = [0, -1, 0].
    # The resampled mean difference is -K/3 with K ~ Binomial(3, 1/3): P(K=3) = 1/27 > 2.5%, P(K=0) = 8/27.
    teacher = np.array([1.0, 1.0, 0.0])
    student = np.array([1.0, 0.0, 0.0])
    _, _, diff, _ = paired_mean_bootstrap(teacher, student, resamples=20000, seed=11)
    assert diff.estimate == pytest.approx(-1 / 3)
    assert diff.low == pytest.approx(-1.0)
    assert diff.high == pytest.approx(0.0)
    idx = resample_indices(3, 20000, 11)
    boot = (student[idx] - teacher[idx]).mean(axis=1)
    assert boot.mean() == pytest.approx(-1 / 3, abs=0.01)
    assert np.mean(boot == -1.0) == pytest.approx(1 / 27, abs=0.004)


def test_retention_drops_resamples_where_the_teacher_scores_zero():
    # Teacher right only on item 0: it scores 0 whenever item 0 is not drawn, probability (2/3)^3 = 8/27.
    teacher = np.array([1.0, 0.0, 0.0])
    student = np.array([1.0, 1.0, 0.0])
    _, _, _, retention = paired_mean_bootstrap(teacher, student, resamples=20000, seed=4)
    assert retention.estimate == pytest.approx(2.0)
    assert retention.dropped / retention.resamples == pytest.approx(8 / 27, abs=0.015)


def test_generic_bootstrap_pairs_items():
    # Generic statistic over paired arrays: identical arrays give a zero-width difference interval.
    a = np.array([0, 1, 2, 1, 0], dtype=np.int64)
    gold = np.array([0, 1, 1, 1, 2], dtype=np.int64)
    iv = paired_bootstrap(5, lambda i: macro_f1(a[i], gold[i]) - macro_f1(a[i], gold[i]), resamples=200)
    assert iv.low == iv.high == 0.0
    with pytest.raises(UserError, match="between 0 and 1"):
        paired_bootstrap(5, lambda i: 0.0, level=1.5)


def test_flips_lists_lost_and_gained_items():
    lost, gained = flips(["i1", "i2", "i3", "i4"], ["t1", "t2", "t3", "t4"], ["a", "b", "c", "d"],
                         ["a", "x", "c", None], ["x", "b", "c", "d"])
    assert [f.item_id for f in lost] == ["i1"]
    assert [f.item_id for f in gained] == ["i2", "i4"]
    assert lost[0].student == "x" and gained[1].teacher is None
