"""``distillgate dataset generate`` as a real subprocess: in-process gateway, quota stop, SIGKILL + rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _gateway_support import MAIN_POLICY, TINY_POLICY, running_gateway, write_policies
from _generate_support import banking_csv, count_rows, decisions, make_dataset, stored_rows
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store

from conftest import run_cli
from fakes.fake_upstream import Behaviour, fake_upstream


def test_cli_in_process_gateway_ingests_and_generates(tmp_path: Path) -> None:
    policies = write_policies(tmp_path / "policies", MAIN_POLICY, TINY_POLICY)
    traffic = banking_csv(tmp_path, 5)
    db = tmp_path / "gw.db"
    assert run_cli("dataset", "init", str(tmp_path / "ds")).returncode == 0
    with fake_upstream() as fake:
        args = ["dataset", "generate", str(tmp_path / "ds"), "--traffic", str(traffic), "--map", "input=text",
                "--map", "record_id=id", "--template", "Classify: {input}", "--system", "Answer briefly.",
                "--model", "fake-teacher", "-k", "2", "--user", "alice", "--project", "proj-a",
                "--output-type", "summaries", "--policy", str(policies), "--upstream", f"fake={fake.base_url}",
                "--db", str(db)]
        done = run_cli(*args, "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["added"] == 10 and summary["failed"] == 0 and summary["tokens"] > 0
        again = run_cli(*args)  # with the progress bar; nothing left to do
        assert again.returncode == 0, again.stderr
        assert "0 row(s) added, 10 already present" in again.stdout
        assert fake.served == 10
    rows = stored_rows(tmp_path / "ds")
    assert len(rows) == 10 and all(r["output_raw"].startswith("Echo: Classify:") for r in rows)
    run = summary["run"]
    assert all(r["stamp"]["run"] == run for r in rows)
    store = Store.open(db)
    try:
        log = [e.body for e in store.entries(run=run)]
    finally:
        store.close()
    assert len(decisions(log, run)) == 10
    keys = KeyStore(db)
    try:
        made = keys.list(user="alice")
    finally:
        keys.close()
    assert len(made) == 2 and all(k.revoked_at for k in made)  # the job's keys do not outlive it


def test_cli_quota_stop_exits_2_with_reason(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 5)
    with running_gateway(tmp_path) as gw:
        args = ["dataset", "generate", str(root), "--gateway", gw.base_url, "--model", "fake-teacher",
                "--template", "{input}", "--user", "alice", "--project", "tiny", "--output-type", "summaries",
                "--run", "tiny-cli", "--concurrency", "1", "--no-progress"]
        done = run_cli(*args, env={"DISTILLGATE_API_KEY": gw.keys["alice"]})
        assert done.returncode == 2, done.stderr
        assert "RECORDS_PER_RUN_EXCEEDED" in done.stderr and "out of quota" in done.stderr
        assert "3 row(s) added" in done.stdout and "1 denied" in done.stdout
        assert count_rows(root) == 3
        bad = run_cli(*args, "--api-key", "dgk_nope_nope")
        assert bad.returncode == 2 and "AUTH" in bad.stderr
        contract = [a if a != "tiny" else "proj-a" for a in args]
        contract[contract.index("summaries")] = "labels"  # a blocking contract the echoing fake breaks
        contract[contract.index("tiny-cli")] = "proj-a-cli"  # a run belongs to one project: proj-a needs its own
        failed = run_cli(*contract, env={"DISTILLGATE_API_KEY": gw.keys["alice"]})
        assert failed.returncode == 3 and "2 row(s) failed" in failed.stderr and "OUTPUT_FORMAT_VIOLATION" in failed.stderr
    missing = run_cli("dataset", "generate", str(root), "--model", "m", "--template", "{input}", "--project", "p",
                      "--output-type", "o")
    assert missing.returncode == 1 and "--gateway" in missing.stderr


def test_sigkill_then_rerun_is_exactly_once(tmp_path: Path) -> None:
    n, k, concurrency = 30, 2, 4
    root = make_dataset(tmp_path, n)
    with running_gateway(tmp_path) as gw:
        gw.fake.push(*[Behaviour.stall(0.25)] * 400)  # every answer takes a while: requests are in flight
        args = ["dataset", "generate", str(root), "--gateway", gw.base_url, "--api-key", gw.keys["alice"],
                "--model", "fake-teacher", "--template", "Intent of: {input}", "-k", str(k), "--user", "alice",
                "--project", "proj-a", "--output-type", "summaries", "--run", "kill-1", "--concurrency",
                str(concurrency), "--no-progress"]
        proc = subprocess.Popen([sys.executable, "-m", "distillgate", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ))
        deadline = time.monotonic() + 120
        while count_rows(root) < 10:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        stored_at_kill = count_rows(root)
        assert 10 <= stored_at_kill < n * k
        time.sleep(1.0)  # requests the dead client left in flight finish inside the gateway
        gw.fake.clear()
        rerun = subprocess.run([sys.executable, "-m", "distillgate", *args], capture_output=True, text=True,
                               timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{stored_at_kill} already present" in rerun.stdout
        log = gw.log()
    rows = stored_rows(root)
    assert sorted(r["row_id"] for r in rows) == sorted(f"traffic-m{i}:{s}" for i in range(n) for s in range(k))
    allowed = decisions(log, "kill-1")
    used = {r["stamp"]["entry_index"] for r in rows}
    assert len(used) == n * k  # every stored row has its own decision
    unused = [e for e in allowed if e["index"] not in used]
    # quota was spent at most once per stored row, plus the requests in flight at the kill
    assert len(allowed) == n * k + len(unused) and len(unused) <= concurrency
