"""No secret reaches a file a run writes.

A real run: `gateway serve` over the fake teacher (whose upstream key comes from the environment), an API key from
`distillgate keys create`, `distillgate eval` with the key on its command line (teacher and student through the
gateway), then `audit export` of the run. Every file under the run's folder (answers, cards, metrics, report,
threshold, the export, the gateway's log, the store and its witness) is read as bytes and searched for every key
the run used. `eval` once recorded its whole command line, key included, in metrics.json and report.html.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _log_support import STRICT, served

from conftest import run_cli
from fakes.fake_upstream import fake_upstream

UPSTREAM_KEY = "sk-upstream-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def scan(root: Path, secrets: dict[str, str]) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{name} in {path.relative_to(root)}" for name, secret in secrets.items()
                  if secret.encode() in data]
    return found


@pytest.mark.slow
def test_no_key_reaches_any_file_of_an_eval_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADV_UPSTREAM_KEY", UPSTREAM_KEY)
    dest = (tmp_path / "exports").as_uri() + "/"
    policy = {**STRICT, "allowed_destinations": [dest]}
    with served(tmp_path, policies=(policy,), users=("alice", "bob"),
                upstream={"api_key_env": "ADV_UPSTREAM_KEY"}) as s:
        url = s.url + "/v1"
        res = run_cli("eval", "--suite", "banking77", "--sample", "4", "--teacher", "fake-teacher",
                      "--teacher-url", url, "--student", "fake-teacher-large", "--student-url", url,
                      "--api-key", s.keys["alice"], "--user", "alice", "--project", "strict", "--run-id", "sec-run",
                      "--output-type", "evaluation", "--resamples", "50", "--min-routed", "1",
                      "--out", str(tmp_path / "eval"), timeout=300)
        assert res.returncode == 0, res.stderr
        assert s.fake.requests, "the fake teacher was never called"
    exported = run_cli("audit", "export", "--db", str(s.db), "--run", "sec-run", "--to", dest + "sec-run/",
                       "--policy", str(s.policy_dir))
    assert exported.returncode == 0, exported.stderr
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert {"metrics.json", "report.html", "answers.jsonl", "manifest.json", "decisions.jsonl"} <= written
    secrets = {"alice's API key": s.keys["alice"], "bob's API key": s.keys["bob"], "the upstream key": UPSTREAM_KEY}
    assert scan(tmp_path, secrets) == []
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "--api-key ***" in json.dumps(metrics)  # the command is still recorded, without the key


API_KEY_PATTERN = re.compile(rb"dgk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}")


@pytest.mark.slow
def test_no_key_reaches_any_file_of_a_pipeline_run(tmp_path: Path) -> None:
    """`distillgate run` end to end (its own gateway with a fresh key, the fake teacher behind an upstream key):
    the stages' records, dataset, student, metrics, report, bundle and decision-log export hold no key."""
    from test_run_pipeline import tiny_student, write_project

    tiny_student(tmp_path / "tiny")
    with fake_upstream(reply="card_arrival") as fake:
        project = write_project(tmp_path, fake.base_url, eval={"suites": [{"name": "project", "sample": 6}],
                                                               "resamples": 200, "min_routed": 2})
        res = run_cli("run", str(project), env={"TEACHER_API_KEY": UPSTREAM_KEY}, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        sent = [r for r in fake.requests if r["path"].endswith("/chat/completions")]
    assert sent and all(r["headers"].get("authorization") == f"Bearer {UPSTREAM_KEY}" for r in sent)
    assert (tmp_path / "bundles" / "tiny-run-1" / "bundle.json").exists()
    assert scan(tmp_path, {"the upstream key": UPSTREAM_KEY}) == []
    leaked = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
              and API_KEY_PATTERN.search(p.read_bytes())]
    assert leaked == []  # the run's own gateway key, whatever it was
