"""`distillgate run` on a task that is not banking77: the eval suite is the project's own test and golden splits
(its labels, its prompts, the teacher through the gateway), the student is an encoder classifier with a
hard-label baseline, and the out-of-scope label is its own slice."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from _encoder_support import tiny_encoder
from distillgate.data.versions import load_version
from distillgate.pipeline.project import load_project
from distillgate.pipeline.run import Pipeline

from conftest import run_cli
from fakes.fake_upstream import fake_upstream

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["weather", "music", "out_of_scope"]
WORDS = ["rain", "sun", "song", "play", "tune", "snow", "tax", "stocks", "the", "will", "it", "today"]


def write_task(tmp: Path, rows: int = 40) -> dict[str, Path]:
    (tmp / "labels.json").write_text(json.dumps(LABELS))
    texts = {"weather": ["will it rain today", "sun today", "snow the today"],
             "music": ["play the song", "play it tune", "the song today"],
             "out_of_scope": ["the tax", "stocks today", "tax it"]}
    with (tmp / "traffic.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["utterance", "intent"])
        for i in range(rows):
            label = LABELS[i % 3]
            w.writerow([f"{texts[label][i % 3]} {i}", label])  # distinct texts
    policy = json.loads((ROOT / "examples" / "banking77" / "policy.json").read_text())
    policy["approved_datasets"] = ["toy/*"]
    (tmp / "policy.json").write_text(json.dumps(policy))
    return {"labels": tmp / "labels.json", "traffic": tmp / "traffic.csv", "policy": tmp / "policy.json"}


def write_project(tmp: Path, upstream: str, **changes: Any) -> Path:
    files = write_task(tmp)
    tiny_encoder(tmp / "enc", WORDS)
    doc: dict[str, Any] = {
        "name": "toy-study", "project": "internal-compression", "user": "alice", "run": "toy-1",
        "policy": "policy.json", "workdir": "work",
        "teacher": {"model": "fake-teacher", "upstream": upstream},
        "task": {"labels_file": "labels.json", "out_of_scope_label": "out_of_scope"},
        "traffic": {"path": "traffic.csv", "columns": {"input": "utterance", "reference_label": "intent"},
                    "dataset_source": "toy/traffic"},
        "generation": {"max_tokens": 4, "top_logprobs": None, "label_scoring": True, "concurrency": 4},
        "dataset": {"split": {"ratios": {"train": 0.5, "val": 0.0, "test": 0.5}, "seed": 0,
                              "holdout": {"rare_label_max_count": 0, "low_confidence_max_prob": None}}},
        "train": {"recipe": "kd", "student": {"family": "encoder", "encoder": {"path": str(tmp / "enc")}},
                  "kd": {"target": "label_probs", "temperature": 2.0, "hard_weight": 0.5},
                  "epochs": 1, "batch_size": 8, "lr": 1e-3, "threads": 1},
        "compare": {"recipe": "sft"},
        "eval": {"resamples": 100, "min_routed": 1},  # no suites: the project's own test split
    }
    doc.update(changes)
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    del files
    return path


def test_default_teacher_prompt_names_no_domain(tmp_path: Path) -> None:
    project, doc, base = load_project(write_project(tmp_path, "http://127.0.0.1:9/v1"))
    pipeline = Pipeline(project, doc, base)
    try:
        prompt = pipeline.teacher_system
        assert "bank" not in prompt.lower() and "customer" not in prompt.lower()
        assert all(label in prompt for label in LABELS)
        assert [s.name for s in project.eval.suites] == ["project"]
    finally:
        pipeline.close()


@pytest.mark.slow
def test_run_evaluates_on_the_projects_own_test_split(tmp_path: Path) -> None:
    with fake_upstream(reply="weather") as fake:
        project = write_project(tmp_path, fake.base_url,
                                eval={"resamples": 100, "min_routed": 1, "teacher_live_items": 5})
        run = run_cli("run", str(project), timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    work = tmp_path / "work"
    metrics = json.loads((work / "metrics.json").read_text())
    suite = metrics["suites"]["project"]
    answers = [json.loads(line) for line in (work / "eval" / "project" / "answers.jsonl").read_text().splitlines()]
    item_ids = {a["item_id"] for a in answers}
    assert suite["items"] == len(item_ids) > 5
    # the items are the dataset version's test rows: their ids are row ids of the frozen version
    version_rows = load_version(json.loads((work / "stages" / "freeze.json").read_text())["outputs"]["version_dir"])
    by_id = {r["row_id"]: r for r in version_rows}
    assert item_ids <= set(by_id) and {by_id[i]["split"] for i in item_ids} <= {"test", "golden"}
    assert {a["label"] for a in answers if a["role"] == "teacher"} <= set(LABELS)
    # every teacher call (generation and evaluation) is a decision in the log
    conn = sqlite3.connect(work / "distillgate.db")
    bodies = [json.loads(b[0]) for b in conn.execute("SELECT body FROM log WHERE kind='decision'").fetchall()]
    conn.close()
    inference = [b for b in bodies if b["request_kind"] == "inference" and b["decision"] == "allow"]
    # 40 labelling calls; the evaluation reuses those answers and asks 5 items again live
    assert len(inference) == 40 + 5
    teacher_answers = {a["item_id"]: a for a in answers if a["role"] == "teacher"}
    assert all(a["label"] == by_id[i]["teacher_label"] for i, a in teacher_answers.items())
    timed = [a for a in teacher_answers.values() if a["latency_s"] is not None]
    assert len(timed) == 5 and all(a["meta"].get("reused_from") is None for a in timed)
    reuse = suite["teacher"]["reuse"]
    assert (reuse["reused"], reuse["asked_live"], reuse["live_matches"]) == (len(item_ids) - 5, 5, 5)
    teacher_speed = next(s for s in suite["speed"] if s["role"] == "teacher")
    assert (teacher_speed["items"], teacher_speed["untimed"]) == (5, len(item_ids) - 5)
    # the out-of-scope label is a slice of its own, and the kd-vs-sft lift is reported with an interval
    retention = suite["retention"]
    assert {(s["slice"], s["value"]) for s in retention} >= {("scope", "out of scope"), ("scope", "in scope")}
    lift = json.loads((work / "eval" / "project" / "recipe_lift.json").read_text())
    assert lift["primary"] == "kd" and lift["baseline"] == "sft" and lift["items"] == len(item_ids)
    assert {"kd", "sft", "lift"} <= set(lift["accuracy"]) and lift["accuracy"]["lift"]["low"] is not None
    assert suite["headline"]["recipe_lift"] == lift  # on the front page's figures too
    assert "kd vs sft on the same rows" in (work / "report.html").read_text()
    card = json.loads((work / "train" / "model" / "student.json").read_text())
    assert card["family"] == "encoder_classifier" and card["labels"] == LABELS
    assert (work / "train" / "baseline-sft" / "model" / "student.json").exists()


def test_project_suite_is_the_versions_test_and_golden_rows() -> None:
    from distillgate.evals.suites import project_suite

    def row(i: int, split: str, label: str | None, status: str = "pass") -> dict[str, Any]:
        return {"row_id": f"r{i}", "input": f"text {i}", "split": split, "reference_label": label,
                "filter_status": status, "source_file": "traffic.csv"}

    rows = [row(0, "train", "music"), row(1, "test", "music"), row(2, "test", "out_of_scope"),
            row(3, "golden", "weather"), row(4, "test", "weather", "fail"), row(5, "val", "music"),
            row(6, "test", None)]
    suite = project_suite(rows, LABELS, out_of_scope="out_of_scope", golden_ids=["r5"])
    ids = [it.item_id for it in suite.items]
    assert ids == ["r1", "r2", "r3", "r5", "r6"]  # test + golden (by split or locked id); failed rows left out
    by_id = {it.item_id: it for it in suite.items}
    assert by_id["r2"].slices["scope"] == "out of scope" and by_id["r1"].slices["scope"] == "in scope"
    assert by_id["r3"].slices["golden"] == "golden" and by_id["r5"].slices["golden"] == "golden"
    assert by_id["r6"].gold is None and suite.labels == LABELS
    assert "bank" not in suite.messages(suite.items[0])[0]["content"].lower()


def test_the_retrieval_pool_never_holds_a_labelled_or_evaluated_row(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A careless project: the pool is the very traffic file, and a labelled eval file overlaps the pool too."""
    monkeypatch.setenv("DISTILLGATE_CACHE", str(tmp_path / "cache"))
    from distillgate.pipeline.teacher import build_retrieval_teacher, protected_hashes
    from distillgate.teachers.retrieval import content_hash
    from test_teachers_retrieval import NearestLabelModel

    project_file = write_project(tmp_path, "http://127.0.0.1:9/v1")
    with (tmp_path / "traffic.csv").open(newline="") as fh:
        traffic = [r["utterance"] for r in csv.DictReader(fh)]
    with (tmp_path / "evalset.csv").open("w", newline="") as fh:  # 5 traffic texts, re-cased: still the same rows
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for text in traffic[30:35]:
            w.writerow([text.upper(), "music"])
    doc = yaml.safe_load(project_file.read_text())
    doc["teacher"] = {"model": "local/knn", "retrieval": {
        "pool": {"path": "traffic.csv", "columns": {"text": "utterance", "label": "intent"}, "source": "toy",
                 "licence": "CC0"}, "k": 4, "embedder": "hashing"}}
    doc["traffic"]["limit"] = 20
    doc["eval"] = {"suites": [{"name": "heldout", "path": "evalset.csv"}]}
    project_file.write_text(yaml.safe_dump(doc))
    project, loaded, base = load_project(project_file)
    pipeline = Pipeline(project, loaded, base)
    try:
        protected = protected_hashes(pipeline)
        banned = set().union(*protected.values())
        teacher = build_retrieval_teacher(pipeline, base=NearestLabelModel())
        pool = teacher.index.pool  # type: ignore[attr-defined]
        assert not pool.hashes & banned
        sample = {content_hash(str(r["utterance"])) for r in
                  (json.loads(line) for line in pipeline.sample_traffic().read_text().splitlines())}
        assert len(sample) == 20 and sample <= banned
        evaluated = {content_hash(t) for t in traffic[30:35]}
        assert evaluated <= banned
        everything = {content_hash(t) for t in traffic}
        assert len(pool.rows) == len(everything - banned) and pool.excluded == len(everything & banned) > 20
        card = teacher.card().as_dict()["method"]
        assert card["pool"]["excluded_rows"] == pool.excluded and card["pool"]["licence"] == "CC0"
    finally:
        pipeline.close()


@pytest.mark.slow
def test_eval_reads_the_frozen_version_once_and_measures_the_served_int8_student(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval stage reads the version's rows once for the project suite and the reused teacher answers; with
    ``serve: int8`` the student it measures is the quantised one, and its card says so."""
    import distillgate.data.versions as versions

    reads: list[str] = []
    real = versions.load_version
    in_eval: list[bool] = [False]

    def counting(ref: Any, **kw: Any) -> Any:
        if in_eval[0]:
            reads.append(str(ref))
        return real(ref, **kw)

    monkeypatch.setattr(versions, "load_version", counting)
    real_eval = Pipeline.stage_eval

    def stage_eval(self: Pipeline) -> Any:
        in_eval[0] = True
        try:
            return real_eval(self)
        finally:
            in_eval[0] = False

    monkeypatch.setattr(Pipeline, "stage_eval", stage_eval)
    with fake_upstream(reply="weather") as fake:
        path = write_project(tmp_path, fake.base_url,
                             eval={"resamples": 100, "min_routed": 1, "teacher_live_items": 3})
        doc = yaml.safe_load(path.read_text())
        doc["train"]["student"]["encoder"]["serve"] = "int8"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        project, doc, base = load_project(path)
        pipeline = Pipeline(project, doc, base)
        outcomes = pipeline.run()
    assert [o.status for o in outcomes if o.name == "eval"] == ["ran"]
    assert all(o.cpu_seconds >= 0 for o in outcomes)
    assert len(reads) == 1  # suite and reused answers share one read
    work = tmp_path / "work"
    for model in ("model", "baseline-sft/model"):
        assert json.loads((work / "train" / model / "student.json").read_text())["serve"] == "int8"
    cards = (work / "eval" / "project" / "cards.json").read_text()
    assert '"serve": "int8"' in cards
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["suites"]["project"]["teacher"]["reuse"]["asked_live"] == 3
