"""The ``synthesize`` stage of ``distillgate run``: opt-in, governed, and checked by the build that follows."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console

from distillgate.data.store import WorkingCopy
from distillgate.errors import SyntheticShareError
from distillgate.pipeline.project import load_project
from distillgate.pipeline.run import Pipeline
from test_run_pipeline import write_project

from fakes.fake_upstream import fake_upstream

SYNTH = {"edge_cases": {"transforms": ["short", "misspelt", "formatting"], "per_transform": 2},
         "out_of_scope": 2}
DATASET = {"split": {"golden": {"fraction": 0.0}, "holdout": {"enabled": False}}}


def _pipeline(path: Path, *overrides: str) -> Pipeline:
    project, doc, base = load_project(path, list(overrides))
    return Pipeline(project, doc, base, console=Console(stderr=True, quiet=True), project_file=path)


def _output_types(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM log WHERE kind='decision'")]
    finally:
        conn.close()
    return [str(b.get("output_type")) for b in bodies if b.get("request_kind") == "inference"]


def test_synthesize_stage_writes_labels_and_builds(tmp_path: Path) -> None:
    with fake_upstream(reply="card_arrival") as fake:
        path = write_project(tmp_path, fake.base_url, synthesize=SYNTH, dataset=DATASET)
        outcomes = {o.name: o for o in _pipeline(path).run(only="generate")}
        assert outcomes["generate"].status == "ran"
        outcomes = {o.name: o for o in _pipeline(path).run(only="synthesize")}
        assert outcomes["synthesize"].status == "ran", outcomes
        report = outcomes["synthesize"].outputs["report"]
        assert report["added"] == {"edge_case": 6, "out_of_scope": 2}
        build = _pipeline(path).run(only="build")[0]
    work = tmp_path / "work"
    types = _output_types(work / "distillgate.db")
    assert types.count("synthetic_records") == 2  # the two written out-of-scope messages
    assert types.count("labels") == 30 + 8  # real rows, then every synthetic input in its own labelling call
    with WorkingCopy.open(work / "dataset") as wc:
        synthetic = [r for r in wc.rows() if r.synthetic is not None]
    assert len(synthetic) == 8 and all(r.split in ("train", "excluded") for r in synthetic)
    train = build.outputs["synthetic"]["by_split"]["train"]
    assert train["synthetic"] >= 1 and "synthetic" in build.summary


def test_without_a_section_the_stage_is_skipped_and_the_cap_holds(tmp_path: Path) -> None:
    with fake_upstream(reply="card_arrival") as fake:
        path = write_project(tmp_path, fake.base_url, dataset=DATASET)
        outcomes = {o.name: o for o in _pipeline(path).run(only="generate")}
        skipped = _pipeline(path).run(only="synthesize")[0]
        assert skipped.status == "skipped" and fake.served == outcomes["generate"].outputs["rows"]
        with pytest.raises(SyntheticShareError, match="max_train_share"):
            _pipeline(path, "synthesize.edge_cases.per_transform=30",
                      "dataset.synthetic.max_train_share=0.2").run(only="synthesize")
        assert fake.served == 30  # refused before any call
