"""Security through a real `gateway serve` process: denials are logged, secrets never leak, forgery is rejected,
exports stay inside their roots. (Unit-level auth cases live in tests/test_gateway_api.py; log tampering of every
kind in tests/test_ledger_log.py.)"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from _reliability_support import gateways, log_bodies, write_config
from distillgate.gateway.stamps import Stamp
from distillgate.keys import KeyStore

from conftest import run_cli
from fakes.fake_upstream import fake_upstream

SEC_POLICY: dict[str, Any] = {
    "policy_id": "sec",
    "allowed_projects": ["open", "closed"],
    "allowed_outputs": ["summaries"],
    "quotas": {"tokens_per_day": 100_000, "records_per_run": 1000, "default_max_tokens": 8},
    "approved_models": ["fake-teacher"],
    "project_users": {"open": ["alice", "bob"], "closed": ["bob"]},
    "audit": {"log_content": True},
}
BODY = {"model": "fake-teacher", "messages": [{"role": "user", "content": "summarise this"}], "max_tokens": 4}


def ident(user: str = "alice", project: str = "open", run: str = "sec-run") -> dict[str, str]:
    return {"X-Policy-User": user, "X-Policy-Project": project, "X-Policy-Run": run,
            "X-Policy-Output-Type": "summaries"}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One gateway process, a set of good and bad requests, then an export; everything the tests below inspect."""
    tmp = tmp_path_factory.mktemp("sec")
    db = tmp / "sec.db"
    exports = tmp / "exports"
    policy = {**SEC_POLICY, "allowed_destinations": [exports.as_uri() + "/"]}
    ks = KeyStore(db)
    alice_rec, alice = ks.create("alice")
    _, bob = ks.create("bob")
    revoked_rec, revoked = ks.create("alice")
    ks.revoke(revoked_rec.key_id)
    ks.close()
    answers: dict[str, httpx.Response] = {}
    with fake_upstream() as fake:
        cfg = write_config(tmp, db, fake.base_url, policies=(policy,), access_log=True)
        with gateways(cfg, tmp, 1) as (gw,):
            url = gw.url + "/v1/chat/completions"
            cases = {
                "ok": {**ident(), "Authorization": f"Bearer {alice}"},
                "no_key": ident(),
                "revoked": {**ident(), "Authorization": f"Bearer {revoked}"},
                "other_users_key": {**ident("alice"), "Authorization": f"Bearer {bob}"},
                "project_not_allowed": {**ident("alice", "closed"), "Authorization": f"Bearer {alice}"},
                "altered_key": {**ident(), "Authorization": f"Bearer {alice}x"},
            }
            for name, hdrs in cases.items():
                answers[name] = httpx.post(url, json=BODY, headers=hdrs, timeout=10)
            pem = httpx.get(gw.url + "/healthz").status_code  # the process is alive until here
            assert pem == 200
        server_output = gw.output()
    export_res = run_cli("audit", "export", "--db", str(db), "--run", "sec-run", "--to", exports.as_uri() + "/",
                         "--policy", str(tmp / "policies"), "--user", "alice")
    keys_list = run_cli("keys", "list", "--db", str(db))
    log_cli = run_cli("audit", "log", "--db", str(db), "--limit", "1000")
    return {"tmp": tmp, "db": db, "exports": exports, "answers": answers, "secrets": [alice, bob, revoked],
            "server_output": server_output, "export": export_res, "keys_list": keys_list, "log_cli": log_cli,
            "alice_key_id": alice_rec.key_id}


def test_bad_credentials_and_claims_are_denied_and_logged(scenario: dict[str, Any]) -> None:
    answers: dict[str, httpx.Response] = scenario["answers"]
    assert answers["ok"].status_code == 200
    expected = {"no_key": (401, "AUTH_MISSING"), "revoked": (401, "KEY_REVOKED"),
                "other_users_key": (403, "USER_MISMATCH"), "project_not_allowed": (403, "USER_NOT_ALLOWED"),
                "altered_key": (401, "AUTH_INVALID")}
    decisions = {e["index"]: e for e in log_bodies(scenario["db"]) if e["kind"] == "decision"}
    for name, (status, reason) in expected.items():
        r = answers[name]
        assert r.status_code == status, (name, r.text)
        assert reason in r.json()["error"]["reasons"], (name, r.text)
        entry = decisions[int(r.headers["x-distillgate-decision"])]
        assert entry["decision"] == "deny" and reason in entry["reasons"], (name, entry)


def test_api_keys_never_appear_in_store_logs_or_exports(scenario: dict[str, Any]) -> None:
    assert scenario["export"].returncode == 0, scenario["export"].stdout + scenario["export"].stderr
    exported = list(scenario["exports"].rglob("*"))
    assert any(p.name == "decisions.jsonl" for p in exported)
    haystacks: dict[str, bytes] = {p.name: p.read_bytes() for p in exported if p.is_file()}
    for p in scenario["tmp"].glob("sec.db*"):  # the SQLite file and its WAL
        haystacks[p.name] = p.read_bytes()
    haystacks["server output"] = scenario["server_output"].encode()
    haystacks["keys list"] = scenario["keys_list"].stdout.encode()
    haystacks["audit log"] = scenario["log_cli"].stdout.encode()
    assert b"POST /v1/chat/completions" in haystacks["server output"]  # the access log was on
    for secret in scenario["secrets"]:
        for what, data in haystacks.items():
            assert secret.encode() not in data, f"an API key leaked into {what}"
            # not even its secret part (dgk_<public key id>_<secret>)
            assert secret.split("_", 2)[2].encode() not in data, f"an API key's secret leaked into {what}"
    assert scenario["alice_key_id"] in scenario["keys_list"].stdout  # the public id is what identifies a key


def test_stamp_and_log_reject_forgery(scenario: dict[str, Any], tmp_path: Path) -> None:
    db: Path = scenario["db"]
    ok = scenario["answers"]["ok"]
    stamp = Stamp.from_header(ok.headers["x-distillgate-stamp"])
    pem = run_cli("audit", "pubkey", "--db", str(db)).stdout
    assert stamp.verify(pem)
    other = tmp_path / "other.db"
    run_cli("audit", "checkpoint", "--db", str(other))
    other_pem = run_cli("audit", "pubkey", "--db", str(other)).stdout
    assert other_pem and other_pem != pem
    assert not stamp.verify(other_pem)  # a stamp signed with another key is not ours
    assert not Stamp({**stamp.payload, "user": "mallory"}, stamp.signature).verify(pem)
    (tmp_path / "other.pem").write_text(other_pem)
    wrong_key = run_cli("audit", "verify", "--db", str(db), "--public-key", str(tmp_path / "other.pem"))
    assert wrong_key.returncode == 2
    # edit one entry in a copy of the store: verify fails and names it
    copy = tmp_path / "edited.db"
    src = sqlite3.connect(db)
    dst = sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    idx, body = dst.execute("SELECT idx, body FROM log WHERE kind='decision' ORDER BY idx LIMIT 1").fetchone()
    edited = json.loads(body)
    edited["user"] = "mallory"
    dst.execute("UPDATE log SET body=? WHERE idx=?", (json.dumps(edited).encode(), idx))
    dst.commit()
    dst.close()
    res = run_cli("audit", "verify", "--db", str(copy))
    assert res.returncode == 2 and f"first bad index {idx}" in res.stderr, res.stderr


@pytest.mark.parametrize("run", ["../../escape", "/abs", "a/../../b"])
def test_export_of_a_traversing_run_name_stays_inside_the_root(scenario: dict[str, Any], run: str) -> None:
    # run names are data, never paths: an export names its files itself, inside the destination
    res = run_cli("audit", "export", "--db", str(scenario["db"]), "--run", run, "--to",
                  scenario["exports"].as_uri() + "/", "--policy", str(scenario["tmp"] / "policies"))
    assert res.returncode != 0 and "no decisions recorded" in res.stderr
    outside = [p for p in scenario["tmp"].parent.rglob("escape*")]
    assert not outside


@pytest.mark.parametrize("dest", ["{exports}/../elsewhere/", "{exports}-evil/", "file:///etc/"])
def test_export_outside_allowed_destinations_is_denied_and_logged(scenario: dict[str, Any], dest: str) -> None:
    exports: Path = scenario["exports"]
    url = dest.format(exports=exports.as_uri())
    before = len(log_bodies(scenario["db"]))
    res = run_cli("audit", "export", "--db", str(scenario["db"]), "--run", "sec-run", "--to", url,
                  "--policy", str(scenario["tmp"] / "policies"))
    assert res.returncode != 0 and "denied" in res.stderr, res.stderr
    new = log_bodies(scenario["db"])[before:]
    assert [e["decision"] for e in new if e["kind"] == "decision"] == ["deny"]
    assert not (exports.parent / "elsewhere").exists() and not Path(str(exports) + "-evil").exists()
