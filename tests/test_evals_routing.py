"""Routing: the serving-time rule, the coverage–accuracy sweep, the threshold choice and its file format."""

from __future__ import annotations

import json
import math

import pytest

from distillgate.errors import ConfigError, NotFoundError
from distillgate.evals.routing import (
    RouteThreshold,
    choose_threshold,
    coverage_curve,
    load_threshold,
    route,
    save_threshold,
)


def test_route_rule():
    assert route(0.9, 0.8) == "student"
    assert route(0.8, 0.8) == "student"
    assert route(0.79, 0.8) == "teacher"
    assert route(None, 0.1) == "teacher"
    assert route(math.nan, 0.1) == "teacher"
    assert route(1.0, math.inf) == "teacher"


def test_coverage_curve_hand_values():
    conf = [0.9, 0.8, 0.7, 0.6, None]
    student = [True, True, False, True, True]
    teacher = [True, True, True, False, True]
    pts = coverage_curve(conf, student, teacher)
    assert [p.threshold for p in pts] == [math.inf, 0.9, 0.8, 0.7, 0.6]
    assert [p.routed for p in pts] == [0, 1, 2, 3, 4]
    assert pts[0].system_accuracy == pytest.approx(4 / 5)
    # threshold 0.7: student takes items 0-2 (2 of 3 right); teacher keeps items 3, 4 (1 of 2 right)
    p = pts[3]
    assert p.coverage == pytest.approx(3 / 5)
    assert p.student_accuracy == pytest.approx(2 / 3)
    assert p.teacher_accuracy == pytest.approx(1.0)
    assert p.system_accuracy == pytest.approx(3 / 5)
    # threshold 0.6: item 3 goes to the student, who is right where the teacher was wrong
    assert pts[4].system_accuracy == pytest.approx(4 / 5)


def test_choose_threshold_takes_most_coverage_within_target():
    conf = [0.95, 0.9, 0.85, 0.8, 0.3, 0.2]
    student = [True, True, True, True, False, False]
    teacher = [True] * 6
    pts = coverage_curve(conf, student, teacher)
    chosen = choose_threshold(pts, target=0.95, min_items=2)
    assert chosen.threshold == 0.8 and chosen.coverage == pytest.approx(4 / 6)
    # looser target admits the 0.3 item (4/5 = 0.8 >= 0.8 * 1.0)
    assert choose_threshold(pts, target=0.8, min_items=2).threshold == 0.3
    # too few items never qualify: everything to the teacher
    none = choose_threshold(pts, target=0.95, min_items=10)
    assert math.isinf(none.threshold) and none.coverage == 0.0


def test_threshold_file_round_trip(tmp_path):
    thr = RouteThreshold(threshold=0.42, confidence="label_prob", student="s", teacher="t", suite="banking77",
                         target=0.95, min_items=10, coverage=0.5, student_accuracy=0.9, items=100)
    path = tmp_path / "threshold.json"
    save_threshold(thr, path)
    data = json.loads(path.read_text())
    assert data["format"] == "distillgate.route-threshold/1" and data["threshold"] == 0.42
    loaded = load_threshold(path)
    assert loaded == thr
    assert loaded.decide(0.5) == "student" and loaded.decide(0.1) == "teacher"


def test_infinite_threshold_is_written_as_inf(tmp_path):
    thr = RouteThreshold(threshold=math.inf, confidence="mean_token_prob", student="s", teacher="t",
                         suite="x", target=0.95, min_items=10, coverage=0.0, items=3)
    path = tmp_path / "t.json"
    save_threshold(thr, path)
    assert json.loads(path.read_text())["threshold"] == "inf"
    assert load_threshold(path).decide(1.0) == "teacher"


def test_bad_threshold_file_reports_every_issue(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"threshold": "high", "confidence": "vibes", "colour": "red"}))
    with pytest.raises(ConfigError) as err:
        load_threshold(path)
    paths = {i.path for i in err.value.issues}
    assert {"threshold", "confidence", "colour", "student", "teacher"} <= paths
    with pytest.raises(NotFoundError, match="route choose"):
        load_threshold(tmp_path / "missing.json")
