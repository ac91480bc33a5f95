from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from distillgate.destinations import parse_destination, safe_relative_name, write_files
from distillgate.errors import DestinationError
from distillgate.ledger import Store
from distillgate.policy import policy_from_data

from _foundation_support import SEED, request, write_policy
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_validate_ok_and_every_error_with_exit_1(tmp_path: Path) -> None:
    good = write_policy(tmp_path, name="good.json")
    ok = run_cli("policy", "validate", str(good))
    assert ok.returncode == 0 and "1 policy valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy_id: x\nallowed_projects: [a]\nallowed_outputs: [labels]\nquotas: {tokens_per_dya: 3}\n"
                   "audit: {reason_codes: maybe}\n")
    res = run_cli("policy", "validate", str(good), str(bad))
    assert res.returncode == 1
    assert "quotas.tokens_per_dya" in res.stderr and "did you mean 'tokens_per_day'" in res.stderr
    assert "audit.reason_codes" in res.stderr and "2 problem(s)" in res.stderr


def test_explain_prints_decision_and_exit_code(tmp_path: Path) -> None:
    policy = write_policy(tmp_path)
    allowed = tmp_path / "ok.json"
    allowed.write_text(json.dumps({"policy_user": "alice", "policy_project_id": "internal-compression",
                                   "policy_run_id": "r1", "policy_output_type": "labels", "model": "m",
                                   "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}))
    res = run_cli("policy", "explain", "--policy", str(policy), "--request", str(allowed))
    assert res.returncode == 0 and res.stdout.startswith("ALLOW") and "ALLOWED" in res.stdout
    denied = tmp_path / "no.json"
    denied.write_text(json.dumps({"policy_user": "alice", "policy_project_id": "elsewhere", "policy_run_id": "r1",
                                  "policy_output_type": "credentialed_api_replication", "max_tokens": 300000}))
    res = run_cli("policy", "explain", "--policy", str(policy), "--request", str(denied), "--json")
    assert res.returncode == 2
    out = json.loads(res.stdout)
    assert set(out["reasons"]) == {"PROJECT_NOT_ALLOWED", "OUTPUT_TYPE_BLOCKED", "TOKENS_PER_DAY_EXCEEDED"}
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"policy_usr": "alice"}))
    res = run_cli("policy", "explain", "--policy", str(policy), "--request", str(typo))
    assert res.returncode == 1 and "policy_usr" in res.stderr


def test_policy_test_runner(tmp_path: Path) -> None:
    ok = run_cli("policy", "test", str(ROOT / "examples" / "policy-tests"))
    assert ok.returncode == 0 and "0 failed" in ok.stdout
    write_policy(tmp_path)
    (tmp_path / "wrong_test.yaml").write_text(
        "policy: policy.json\ncases:\n  - name: expects the impossible\n"
        "    request: {policy_user: a, policy_project_id: nope, policy_run_id: r, policy_output_type: labels}\n"
        "    expect: {decision: allow}\n")
    res = run_cli("policy", "test", str(tmp_path))
    assert res.returncode == 1 and "FAIL" in res.stdout and "PROJECT_NOT_ALLOWED" in res.stdout
    assert "0 passed, 1 failed" in res.stdout


def test_audit_verify_and_export_cli(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    policy_path = write_policy(tmp_path, {**SEED, "allowed_destinations": [(tmp_path / "out").as_uri() + "/"]})
    policy = policy_from_data(json.loads(policy_path.read_text()))
    with Store.open(db, checkpoint_every=4) as store:
        for _ in range(10):
            store.admit(policy, request(run="r9"))
    ok = run_cli("audit", "verify", "--db", str(db))
    assert ok.returncode == 0 and "ok: 10 entries" in ok.stdout
    pub = tmp_path / "pub.pem"
    pub.write_text(run_cli("audit", "pubkey", "--db", str(db)).stdout)
    exported = run_cli("audit", "export", "--db", str(db), "--run", "r9", "--to", (tmp_path / "out").as_uri() + "/",
                       "--policy", str(policy_path), "--user", "alice")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "out" / "manifest.json").exists()
    refused = run_cli("audit", "export", "--db", str(db), "--run", "r9", "--to", "s3://somewhere-else/",
                      "--policy", str(policy_path))
    assert refused.returncode == 2 and "DESTINATION_NOT_APPROVED" not in refused.stdout
    assert "denied" in refused.stderr
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM log WHERE idx=5")
    conn.close()
    bad = run_cli("audit", "verify", "--db", str(db), "--public-key", str(pub))
    assert bad.returncode == 2 and "first bad index 5" in bad.stderr


def test_missing_db_and_debug_tracebacks(tmp_path: Path) -> None:
    res = run_cli("audit", "verify", "--db", str(tmp_path / "none.db"))
    assert res.returncode == 1 and "no store at" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("audit", "verify", "--db", str(tmp_path / "none.db"), env={"DISTILLGATE_DEBUG": "1"})
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_db_default_comes_from_environment(tmp_path: Path) -> None:
    db = tmp_path / "env.db"
    with Store.open(db) as store:
        store.admit(policy_from_data(SEED), request())
    res = run_cli("audit", "verify", env={"DISTILLGATE_DB": str(db)})
    assert res.returncode == 0 and "1 entries" in res.stdout


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", "", "c:evil"])
def test_destinations_refuse_path_traversal(tmp_path: Path, name: str) -> None:
    with pytest.raises(DestinationError):
        safe_relative_name(name)
    with pytest.raises(DestinationError):
        write_files(tmp_path.as_uri(), {name: b"x"})
    assert not (tmp_path.parent / "escape.txt").exists()


def test_destination_parsing() -> None:
    assert parse_destination("s3://bucket/a/b").prefix == "a/b/"
    with pytest.raises(DestinationError, match="scheme"):
        parse_destination("ftp://x/")
    with pytest.raises(DestinationError, match="no bucket"):
        parse_destination("s3:///x")
