"""The run report's real vs synthetic measures: train fit on real and synthetic train rows, and the edge-case
probe (held-out rows under deterministic transforms, gold kept) next to the real test slice, with intervals."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console

from distillgate.data.versions import load_version
from distillgate.errors import ConfigError, UserError
from distillgate.evals.answers import run_source
from distillgate.evals.edge_probe import PROBE_TRANSFORMS, probe_items, probe_text
from distillgate.evals.sources import student_source
from distillgate.evals.suites import Item, Suite
from distillgate.pipeline.project import load_project
from distillgate.pipeline.run import Pipeline
from distillgate.pipeline.synthetic_eval import train_rows
from test_pipeline_project_eval import LABELS, write_project

from fakes.fake_upstream import fake_upstream

SYNTH = {"edge_cases": {"transforms": ["short", "misspelt", "formatting"], "per_transform": 3}}
EVAL = {"resamples": 100, "min_routed": 1, "teacher_live_items": 2, "edge_probe": {"sample": 5}}


def _pipeline(path: Path, *overrides: str) -> Pipeline:
    project, doc, base = load_project(path, list(overrides))
    return Pipeline(project, doc, base, console=Console(stderr=True, quiet=True), project_file=path)


def _inference_calls(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM log WHERE kind='decision'")]
    finally:
        conn.close()
    return sum(b.get("request_kind") == "inference" and b.get("decision") == "allow" for b in bodies)


def test_report_shows_train_fit_and_edge_probe_with_synthesize_on(tmp_path: Path) -> None:
    with fake_upstream(reply="weather") as fake:
        path = write_project(tmp_path, fake.base_url, synthesize=SYNTH, eval=EVAL)
        outcomes = {o.name: o for o in _pipeline(path).run()}
        assert outcomes["report"].status == "ran", outcomes
        work = tmp_path / "work"
        calls_before_eval = 40 + 9  # every real row, every synthetic input, each in its own labelling call
        probe_calls = _inference_calls(work / "distillgate.db") - calls_before_eval - 2  # 2 live project items
    metrics = json.loads((work / "metrics.json").read_text())
    rows = load_version(json.loads((work / "stages" / "freeze.json").read_text())["outputs"]["version_dir"])
    by_id = {r["row_id"]: r for r in rows}
    section = metrics["synthetic"]

    # train fit: real and synthetic train rows apart, counts and share from the version itself
    trained = train_rows(rows)
    n_syn = sum(r.get("synthetic") is not None for r in trained)
    assert n_syn >= 1
    groups = section["train_fit"]["groups"]
    assert groups["real"]["train_rows"] == len(trained) - n_syn and groups["synthetic"]["train_rows"] == n_syn
    assert groups["synthetic"]["share_of_train"] == pytest.approx(n_syn / len(trained), abs=1e-6)
    assert groups["real"]["scored"] == len(trained) - n_syn and groups["synthetic"]["scored"] == n_syn
    assert sum(g["train_rows"] for k, g in groups.items() if k.startswith("synthetic:")) == n_syn
    # the agreement is the student's own answers on those rows against the label each was trained on
    syn_rows = sorted((r for r in trained if r.get("synthetic") is not None), key=lambda r: r["row_id"])
    student = student_source(work / "train" / "model")
    try:
        suite = Suite("x", "classification", [Item(r["row_id"], r["input"], None) for r in syn_rows], LABELS)
        predicted = [a.label for a in run_source(suite, student, "student", mode="score")]
    finally:
        student.close()
    agree = groups["synthetic"]["student_agrees_with_trained_label"]
    assert agree["estimate"] == pytest.approx(
        sum(p == r["label"] for p, r in zip(predicted, syn_rows, strict=True)) / n_syn)
    assert agree["low"] <= agree["estimate"] <= agree["high"] and agree["n"] == n_syn
    assert groups["synthetic"]["teacher_label_is_intended"]["n"] == n_syn  # edge cases intend their seed's label
    assert groups["real"]["teacher_label_is_gold"]["estimate"] == pytest.approx(
        sum(r["label"] == r["reference_label"] for r in trained if r.get("synthetic") is None) / (len(trained) - n_syn))

    # the edge-case probe: held-out rows under every transform, their own gold label, never a training input
    answers = [json.loads(x) for x in (work / "eval" / "edge_probe" / "answers.jsonl").read_text().splitlines()]
    teacher = [a for a in answers if a["role"] == "teacher"]
    probe = section["edge_probe"]
    n_probe = probe["slices"]["all"]["n"]
    assert len(teacher) == n_probe == probe["items"] and probe_calls == n_probe  # each one a governed call
    train_inputs = {r["input"] for r in rows if r["split"] == "train"}
    golds = []
    for a in teacher:
        source_id, transform = a["item_id"].split("~")
        source = by_id[source_id]
        assert source["split"] in ("test", "golden") and transform in PROBE_TRANSFORMS
        assert probe_text(transform, source_id, source["input"]) not in train_inputs
        golds.append(source["reference_label"])
    # scored against the source row's own gold label
    assert probe["slices"]["all"]["teacher_accuracy"]["estimate"] == pytest.approx(
        sum(a["label"] == g for a, g in zip(teacher, golds, strict=True)) / len(golds))
    assert set(probe["slices"]) == {"all", *(a["item_id"].split("~")[1] for a in teacher)}
    # the toy's two-word forms ("sun today") are trained on as synthetic `short` edge cases: those probes are left out
    assert probe["meta"]["dropped"]["equals_a_training_input"] >= 1 and "short" not in probe["slices"]
    assert n_probe + sum(probe["meta"]["dropped"].values()) == 5 * len(PROBE_TRANSFORMS)
    assert section["real_test"]["suite"] == "project"
    assert section["real_test"]["n"] == metrics["suites"]["project"]["items"]
    # a finding of the report, not a suite the promotion gates read
    files = json.loads((work / "stages" / "eval.json").read_text())["outputs"]["files"]
    assert "edge_probe_slice" in files and not any(k.startswith("edge_probe") and k.endswith("_metrics") for k in files)
    page = (work / "report.html").read_text()
    assert "Real vs synthetic" in page and "edge-case probe (all)" in page and "student = trained label" in page

    # switched off, the eval stage measures neither and the report has no such section
    with fake_upstream(reply="weather") as fake:
        off = ["eval.edge_probe.enabled=false", "eval.train_fit.enabled=false", f"teacher.upstream={fake.base_url}"]
        _pipeline(path, *off).run(only="eval")
        _pipeline(path, *off).run(only="report")
    assert "synthetic" not in json.loads((work / "metrics.json").read_text())
    assert "Real vs synthetic" not in (work / "report.html").read_text()


def test_probe_items_keep_the_label_and_never_equal_a_training_input() -> None:
    items = [Item("r1", "I still have not received my new card", "card_arrival"),
             Item("r2", "why was my transfer declined", None)]
    made, dropped = probe_items(items, PROBE_TRANSFORMS, fallback_gold={"r2": "declined_transfer"})
    assert len(made) == 8 and dropped == {"no_label": 0, "unchanged_or_empty": 0, "equals_a_training_input": 0}
    assert {it.gold for it in made if it.item_id.startswith("r1~")} == {"card_arrival"}
    assert {it.slices["gold"] for it in made if it.item_id.startswith("r2~")} == {"teacher's stored label"}
    assert made == probe_items(items, PROBE_TRANSFORMS, fallback_gold={"r2": "declined_transfer"})[0]  # deterministic
    # a probe text that is a training input is left out (the short form "I still" is trained on, say)
    short = probe_text("short", "r1", items[0].text)
    kept, dropped = probe_items(items[:1], ["short", "misspelt"], exclude_texts=[short.upper()])
    assert [it.slices["transform"] for it in kept] == ["misspelt"] and dropped["equals_a_training_input"] == 1
    # without a gold or a stored label there is nothing to score against
    assert probe_items(items[1:], ["short"])[1]["no_label"] == 1
    with pytest.raises(UserError, match="cannot keep"):
        probe_items(items, ["empty"])


def test_project_file_refuses_probe_transforms_that_lose_the_label(tmp_path: Path) -> None:
    path = write_project(tmp_path, "http://127.0.0.1:9/v1", eval={"edge_probe": {"transforms": ["long"]}})
    with pytest.raises(ConfigError, match="edge_probe"):
        load_project(path)


def test_a_probe_with_nothing_left_is_a_finding_of_the_report() -> None:
    from distillgate.pipeline.report import synthetic_html, synthetic_section

    section = synthetic_section({"edge_probe": {"skipped": "the edge-case probe has no item left", "items": 0,
                                                "slices": {}, "compared_with": "project"}}, {}, {})
    assert "the edge-case probe has no item left" in synthetic_html(section["synthetic"])
    assert synthetic_section({}, {}, {}) == {} and synthetic_html(None) == ""
