"""``distillgate gateway serve`` as operators run it: flags only, a config file, and clear config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from _gateway_support import MAIN_POLICY, free_port, write_policies

from conftest import run_cli
from fakes.fake_upstream import fake_upstream


def test_check_merges_flags_over_config(tmp_path: Path) -> None:
    policies = write_policies(tmp_path / "p", MAIN_POLICY)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"policy: {policies}\nport: 9000\nupstreams:\n  a:\n    base_url: http://127.0.0.1:1/v1\n")
    res = run_cli("gateway", "serve", "--config", str(cfg), "--port", "9100", "--upstream",
                  "b=http://127.0.0.1:2/v1", "--model", "gpt-*=b", "--check")
    assert res.returncode == 0, res.stderr
    assert '"port": 9100' in res.stdout and '"gpt-*": "b"' in res.stdout and '"a"' in res.stdout


def test_config_errors_are_all_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("policy: /nonexistent\nprot: 1\nupstreams:\n  a:\n    base_url: ftp://x\n"
                   "    api_key_env: DISTILLGATE_UNSET_FOR_TEST\nmodels:\n  m: missing\n")
    res = run_cli("gateway", "serve", "--config", str(cfg), "--check")
    assert res.returncode == 1
    for fragment in ("prot", "did you mean 'port'"):
        assert fragment in res.stderr
    res = run_cli("gateway", "serve", "--config", str(cfg).replace("gateway.yaml", "nothing.yaml"))
    assert res.returncode != 0
    cfg.write_text("policy: /nonexistent\nupstreams:\n  a:\n    base_url: ftp://x\n"
                   "    api_key_env: DISTILLGATE_UNSET_FOR_TEST\nmodels:\n  m: missing\n")
    res = run_cli("gateway", "serve", "--config", str(cfg), "--check")
    assert res.returncode == 1
    for fragment in ("base_url", "DISTILLGATE_UNSET_FOR_TEST", "models.m", "policy"):
        assert fragment in res.stderr
    res = run_cli("gateway", "serve", "--upstream", "nourl", "--policy", "x")
    assert res.returncode == 1 and "NAME=BASE_URL" in res.stderr


def test_serve_with_flags_only(tmp_path: Path) -> None:
    policies = write_policies(tmp_path / "p", MAIN_POLICY)
    db = tmp_path / "gw.db"
    key = run_cli("keys", "create", "--user", "alice", "--db", str(db)).stdout.strip()
    port = free_port()
    with fake_upstream() as fake:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distillgate", "gateway", "serve", "--policy", str(policies), "--upstream",
             f"fake={fake.base_url}", "--db", str(db), "--host", "127.0.0.1", "--port", str(port)],
            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
            resp = c.chat.completions.create(
                model="fake-teacher", messages=[{"role": "user", "content": "ping"}],
                extra_body={"metadata": {"policy_user": "alice", "policy_project_id": "proj-a",
                                         "policy_run_id": "r1", "policy_output_type": "summaries"}})
            assert resp.choices[0].message.content == "Echo: ping"
        finally:
            proc.terminate()
            proc.wait(20)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status tells why
    assert proc.returncode in (0, -signal.SIGTERM)
    assert proc.stderr is not None and b"Application shutdown complete" in proc.stderr.read()
    res = run_cli("audit", "verify", "--db", str(db))
    assert res.returncode == 0, res.stdout + res.stderr


def test_example_config_validates() -> None:
    root = Path(__file__).resolve().parent.parent
    res = run_cli("gateway", "serve", "--config", str(root / "examples" / "gateway.yaml"), "--check", cwd=root)
    assert res.returncode == 0, res.stderr
    assert '"local/*": "local"' in res.stdout
