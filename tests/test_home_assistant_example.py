"""A small version of `distillgate run` on the second example project, examples/home_assistant (another domain, 32
intents and an out-of-scope class), against the fake teacher over HTTP behind a real in-process gateway.

The project file is the example's own; a test changes only what a laptop test must (the fake teacher instead of
the local one with its retrieval pool, a 40-row sample, a tiny student, a temporary workdir).
"""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from distillgate.pipeline.project import load_project
from distillgate.pipeline.run import Pipeline
from test_run_pipeline import tiny_student

from conftest import run_cli
from fakes.fake_upstream import fake_upstream

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "home_assistant"
#: the keys that make the evaluation the project's own: dropped where a test runs the stages before eval
PROJECT_EVAL_KEYS = (("task", "out_of_scope_label"), ("eval", "suites"))


def _absolute(doc: dict[str, Any]) -> None:
    """Paths in the example are relative to its folder; the test's project file lives elsewhere."""
    def fix(value: str) -> str:
        return str((EXAMPLE / value).resolve())

    doc["task"]["labels_file"] = fix(doc["task"]["labels_file"])
    doc["traffic"]["path"] = fix(doc["traffic"]["path"])
    doc["dataset"]["filters"]["allowed_labels_file"] = fix(doc["dataset"]["filters"]["allowed_labels_file"])
    for suite in doc["eval"]["suites"]:
        if "path" in suite:
            suite["path"] = fix(suite["path"])


def small_project(tmp: Path, upstream: str, *, project_eval: bool) -> Path:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLE / "project.yaml").read_text())
    _absolute(doc)
    policy = json.loads((EXAMPLE / "policy.json").read_text())
    policy["allowed_destinations"] = [(tmp / "bundles").as_uri() + "/"]
    (tmp / "policy.json").write_text(json.dumps(policy))
    tiny_student(tmp / "tiny")
    doc.update({"policy": "policy.json", "workdir": "work",
                # the fake teacher behind the gateway instead of the local 135M model (and its retrieval pool,
                # which only the local teacher takes)
                "teacher": {"model": "fake-teacher", "upstream": upstream},
                "export": {"to": (tmp / "bundles" / "ha-1").as_uri() + "/"}})
    doc["traffic"]["limit"] = 40
    doc["generation"].update({"label_scoring": False, "max_tokens": 4, "concurrency": 4})
    doc["train"] = {"recipe": "sft", "student": {"model": {"path": "tiny"}}, "max_steps": 2, "batch_size": 4,
                    "max_length": 128}
    doc["eval"].update({"resamples": 200, "min_routed": 1})
    for suite in doc["eval"]["suites"]:
        if "path" in suite:
            suite["sample"] = 30
    if not project_eval:
        for section, key in PROJECT_EVAL_KEYS:
            doc[section].pop(key, None)
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _stage(path: Path, name: str, *overrides: str) -> tuple[Any, str]:
    project, doc, base = load_project(path, list(overrides))
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)  # not a terminal: as under CI or nohup
    (outcome,) = Pipeline(project, doc, base, console=console, project_file=path).run(only=name)
    return outcome, out.getvalue()


@pytest.mark.slow
def test_pipeline_runs_the_home_assistant_example_up_to_training(tmp_path: Path) -> None:
    """generate → build → freeze → train on the example's own data, labels and prompts; a changed generation
    setting regenerates (never reuses) the answers; progress shows without a terminal."""
    with fake_upstream(reply="HassTurnOn") as fake:
        path = small_project(tmp_path, fake.base_url, project_eval=False)
        gen, log = _stage(path, "generate")
        assert gen.status == "ran" and gen.outputs["rows"] == 40 and fake.served == 40
        assert "teacher generation: 40 answers to ask for (0 already stored)" in log
        assert "teacher generation: 40/40 answers (100%)" in log
        # the teacher was asked with this task's labels, not banking77's
        system = fake.requests[0]["body"]["messages"][0]["content"]
        assert "HassTurnOn" in system and "out_of_scope" in system and "card_arrival" not in system

        again, _ = _stage(path, "generate", "generation.temperature=0.5")
        assert fake.served == 80  # every answer asked again with the new setting
        assert "40 teacher answers added, 40 stale ones (other settings) discarded" in again.summary

        build, _ = _stage(path, "build")
        assert build.outputs["passed"] == 40
        freeze, _ = _stage(path, "freeze")
        assert freeze.outputs["version_id"]
        train, log = _stage(path, "train")
        assert Path(train.outputs["model_dir"], "config.json").exists()

    work = tmp_path / "work"
    with sqlite3.connect(work / "dataset" / "working.sqlite") as conn:
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM rows")]
    assert {b["sampling"]["temperature"] for b in bodies} == {0.5}
    labels = set(json.loads((ROOT / "data" / "home_assistant" / "intents.json").read_text()))
    assert {b["reference_label"] for b in bodies} <= labels
    assert any(b["reference_label"] == "out_of_scope" for b in bodies)
    verify = run_cli("audit", "verify", "--db", str(work / "distillgate.db"))
    assert verify.returncode == 0, verify.stderr


def test_example_project_file_validates() -> None:
    project, _, _ = load_project(EXAMPLE / "project.yaml")  # every path exists, every key is known
    assert project.teacher.retrieval is not None
    assert [s.name for s in project.eval.suites] == ["project", "home_assistant_test"]


def test_published_test_file_suite_has_the_out_of_scope_slice() -> None:
    from distillgate.evals.suites import load_dataset_items

    labels = json.loads((ROOT / "data" / "home_assistant" / "intents.json").read_text())
    suite = load_dataset_items(ROOT / "data" / "home_assistant" / "test.csv", labels=labels,
                               out_of_scope="out_of_scope")
    scopes = [it.slices["scope"] for it in suite.items]
    assert (scopes.count("out of scope"), scopes.count("in scope")) == (39, 346)
    assert suite.labels == labels
    plain = load_dataset_items(ROOT / "data" / "home_assistant" / "test.csv", labels=labels)
    assert all("scope" not in it.slices for it in plain.items)  # no out-of-scope label: no slice


@pytest.mark.slow
def test_run_evaluates_the_example_on_its_own_splits_with_the_out_of_scope_slice(tmp_path: Path) -> None:
    with fake_upstream(reply="HassTurnOn") as fake:
        path = small_project(tmp_path, fake.base_url, project_eval=True)
        done = run_cli("run", str(path), timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "work"
    metrics = json.loads((work / "metrics.json").read_text())
    assert set(metrics["suites"]) == {"project", "home_assistant_test"}
    for name in ("project", "home_assistant_test"):
        suite = metrics["suites"][name]
        assert suite["items"] > 0
        slices = {(s["slice"], s["value"]) for s in suite["retention"]}
        assert ("scope", "in scope") in slices, name
    # the published test file holds out-of-scope requests of kinds never in train (climate, weather)
    assert ("scope", "out of scope") in {(s["slice"], s["value"])
                                         for s in metrics["suites"]["home_assistant_test"]["retention"]}
    assert "banking" not in (work / "report.html").read_text().lower()
    verify = run_cli("audit", "verify", "--db", str(work / "distillgate.db"))
    assert verify.returncode == 0, verify.stderr
