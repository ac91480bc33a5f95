"""`distillgate run` end to end with a real gateway, the fake teacher over HTTP and a tiny real student model."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from _train_support import make_tokenizer
from distillgate.errors import ConfigError
from distillgate.pipeline.project import load_project

from conftest import run_cli
from fakes.fake_upstream import fake_upstream

ROOT = Path(__file__).resolve().parent.parent


def tiny_student(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_project(tmp: Path, upstream: str, **changes: Any) -> Path:
    policy = json.loads((ROOT / "examples" / "banking77" / "policy.json").read_text())
    policy["allowed_destinations"] = [(tmp / "bundles").as_uri() + "/"]
    (tmp / "policy.json").write_text(json.dumps(policy))
    doc: dict[str, Any] = {
        "name": "tiny-study", "project": "internal-compression", "user": "alice", "run": "tiny-run-1",
        "policy": "policy.json", "workdir": "work",
        "teacher": {"model": "fake-teacher", "upstream": upstream},
        "task": {"labels_file": str(ROOT / "data" / "banking77" / "categories.json"),
                 "student_system_prompt": "Classify the bank customer message."},
        "traffic": {"path": str(ROOT / "data" / "banking77" / "train.csv"),
                    "columns": {"input": "text", "reference_label": "category"}, "limit": 30,
                    "dataset_source": "banking77/train"},
        "generation": {"max_tokens": 4, "top_logprobs": 5, "concurrency": 4},
        "train": {"recipe": "sft", "student": {"model": {"path": "tiny"}}, "max_steps": 2, "batch_size": 4,
                  "max_length": 128},
        "eval": {"suites": [{"name": "banking77", "sample": 6}], "resamples": 200, "min_routed": 2},
        "export": {"to": (tmp / "bundles" / "tiny-run-1").as_uri() + "/"},
    }
    for key, value in changes.items():
        doc[key] = value
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_project_file_reports_every_error_at_once(tmp_path: Path) -> None:
    path = write_project(tmp_path, "http://127.0.0.1:9/v1", surprise=1,
                         dataset={"split": {"ratios": {"train": 0.5}}, "nonsense": True},
                         train={"recipe": "dpo", "rows": "x.jsonl"})
    with pytest.raises(ConfigError) as info:
        load_project(path)
    paths = {i.path for i in info.value.issues}
    assert "surprise" in paths and "dataset.nonsense" in paths and "train.rows" in paths
    assert any(p.startswith("dataset.split") for p in paths) and "train.recipe" in paths
    good = write_project(tmp_path, "http://127.0.0.1:9/v1")
    project, doc, _ = load_project(good, ["eval.resamples=300", "traffic.limit=10"])
    assert project.eval.resamples == 300 and project.traffic.limit == 10 and doc["traffic"]["limit"] == 10
    with pytest.raises(ConfigError, match="does not exist"):
        load_project(good, ["traffic.path=/no/such/file.csv"])


def test_run_end_to_end_caches_and_is_governed(tmp_path: Path) -> None:
    tiny_student(tmp_path / "tiny")
    with fake_upstream(reply="card_arrival") as fake:
        project = write_project(tmp_path, fake.base_url)
        first = run_cli("run", str(project), timeout=900)
        assert first.returncode == 0, first.stderr[-3000:]
        work = tmp_path / "work"
        for stage in ("generate", "synthesize", "build", "freeze", "train", "eval", "promote", "report", "export"):
            assert (work / "stages" / f"{stage}.json").exists(), stage
        assert (work / "report.html").read_text().count("banking77") >= 2
        metrics = json.loads((work / "metrics.json").read_text())
        assert metrics["suites"]["banking77"]["items"] == 6 and metrics["dataset_version"]
        bundle = json.loads((tmp_path / "bundles" / "tiny-run-1" / "bundle.json").read_text())
        assert {"project.yaml", "dataset/manifest.json", "training/run.json", "report.html"} <= set(bundle["files"])
        assert (tmp_path / "bundles" / "tiny-run-1" / "decision-log" / "checkpoint.json").exists()

        # every teacher call of the run (generation and evaluation) is a decision in the log
        conn = sqlite3.connect(work / "distillgate.db")
        kinds = conn.execute("SELECT body FROM log WHERE run='tiny-run-1' AND kind='decision'").fetchall()
        conn.close()
        bodies = [json.loads(b[0]) for b in kinds]
        inference = [b for b in bodies if b["request_kind"] == "inference" and b["decision"] == "allow"]
        assert len(inference) == 30 + 6  # 30 generated rows + 6 evaluation items for the teacher
        assert {b["request_kind"] for b in bodies} >= {"dataset", "export"}
        verify = run_cli("audit", "verify", "--db", str(work / "distillgate.db"))
        assert verify.returncode == 0, verify.stderr

        again = run_cli("run", str(project), timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert again.stderr.count("unchanged, skipped") == 9, again.stderr[-3000:]
        served = fake.served

        edited = run_cli("run", str(project), "train.max_steps=3", timeout=900)
        assert edited.returncode == 0, edited.stderr[-2000:]
        assert edited.stderr.count("unchanged, skipped") == 4  # generate, synthesize (off), build, freeze
        assert fake.served == served + 6  # only the evaluation asked the teacher again

        only = run_cli("run", str(project), "train.max_steps=3", "--only", "report", timeout=600)
        assert only.returncode == 0 and "• report" in only.stderr and "• train" not in only.stderr


def test_policy_denials_exit_2(tmp_path: Path) -> None:
    tiny_student(tmp_path / "tiny")
    with fake_upstream(reply="card_arrival") as fake:
        project = write_project(tmp_path, fake.base_url)
        denied = run_cli("run", str(project), "project=moonshot", timeout=600)
        assert denied.returncode == 2, denied.stderr[-2000:]
        assert "PROJECT_NOT_ALLOWED" in denied.stderr or "not in allowed_projects" in denied.stderr
        unapproved = run_cli("run", str(project), "traffic.dataset_source=scraped/forum", timeout=600)
        assert unapproved.returncode == 2 and "approved_datasets" in unapproved.stderr
    bad = run_cli("run", str(project), "nonsense=1")
    assert bad.returncode == 1 and "nonsense" in bad.stderr


def test_remote_example_runs_against_an_openai_compatible_upstream(tmp_path: Path) -> None:
    """examples/banking77/project.remote.yaml, pointed at the fake upstream and shrunk by overrides."""
    tiny_student(tmp_path / "tiny")
    bundle = Path("/tmp/distillgate-bundles") / f"test-{tmp_path.name}"
    with fake_upstream(reply="card_arrival") as fake:
        res = run_cli(
            "run", str(ROOT / "examples" / "banking77" / "project.remote.yaml"),
            f"teacher.upstream={fake.base_url}", "teacher.model=fake-teacher", f"workdir={tmp_path / 'work'}",
            "traffic.limit=12", "generation.max_tokens=3", "train.recipe=sft", "train.max_steps=1",
            f"train.student={{model: {{path: {tmp_path / 'tiny'}}}}}", "train.max_length=96",
            "eval.suites=[{name: banking77, sample: 4}]", "eval.resamples=100", "eval.min_routed=1",
            f"export.to={bundle.as_uri()}/",
            env={"TEACHER_API_KEY": "sk-test-not-a-real-key"}, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        sent = [r for r in fake.requests if r["path"].endswith("/chat/completions")]
    assert len(sent) == 12 + 4 and all(r["body"]["model"] == "fake-teacher" for r in sent)
    assert all("metadata" not in r["body"] for r in sent)  # identity metadata never reaches the upstream
    assert all(r["headers"].get("authorization") == "Bearer sk-test-not-a-real-key" for r in sent)
    assert (bundle / "bundle.json").exists()
    assert "sk-test-not-a-real-key" not in (bundle / "decision-log" / "decisions.jsonl").read_text()
