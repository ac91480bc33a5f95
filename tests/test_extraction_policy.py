"""The policy side: extraction rules decide what a fired signal does; evidence reaches the log; `audit scan`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from _extraction_support import feat, legit_banking, template_sweep
from distillgate.errors import ConfigError
from distillgate.extraction import ExtractionMonitor, RequestFeatures, Signal, log_extra
from distillgate.ledger import Store
from distillgate.policy import Usage, decide, policy_from_data

from _foundation_support import SEED, request
from conftest import run_cli

SWEEP = Signal("template_sweep", 0.9, 0.6, 200, "key", "k-eve", {"near_twins": 180, "requests": 200})


def policy(**extraction: Any) -> Any:
    data = dict(SEED)
    if extraction:
        data["extraction"] = extraction
    return policy_from_data(data)


def test_seed_policy_loads_and_flags_by_default() -> None:
    d = decide(policy(), request(signals=(SWEEP,)), Usage())
    assert d.allowed and "EXTRACTION_FLAGGED" in d.reasons and d.status == 200
    assert any("template_sweep=0.9" in x for x in d.details)


@pytest.mark.parametrize(("action", "code", "allowed", "status"), [
    ("flag", "EXTRACTION_FLAGGED", True, 200),
    ("review", "REVIEW_REQUIRED", True, 200),
    ("throttle", "EXTRACTION_THROTTLED", False, 429),
    ("deny", "EXTRACTION_SUSPECTED", False, 403),
])
def test_each_action(action: str, code: str, allowed: bool, status: int) -> None:
    p = policy(signals={"template_sweep": {"action": action}})
    d = decide(p, request(signals=(SWEEP,)), Usage())
    assert (d.allowed, d.status) == (allowed, status) and code in d.reasons


def test_the_policy_threshold_wins_over_the_signal() -> None:
    p = policy(signals={"template_sweep": {"action": "deny", "threshold": 0.95}})
    d = decide(p, request(signals=(SWEEP,)), Usage())
    assert d.allowed and d.reasons == ("ALLOWED",)
    assert decide(policy(enabled=False), request(signals=(SWEEP,)), Usage()).reasons == ("ALLOWED",)


def test_unknown_signal_and_action_are_rejected_with_every_issue() -> None:
    with pytest.raises(ConfigError) as err:
        policy(signals={"template_swep": {"action": "deny"}, "volume": {"action": "block"}})
    text = str(err.value)
    assert "template_swep" in text and "volume.action" in text


def run_traffic(monitor: ExtractionMonitor, store: Store, p: Any, traffic: list[RequestFeatures]) -> list[Any]:
    out = []
    for f in traffic:
        signals = monitor.observe(f)
        req = request(user=f.user, project="internal-compression", run=f.run, signals=signals)
        out.append(store.admit(p, req, key_id=f.key_id, extra=log_extra(f, signals)))
    return out


def project(traffic: list[RequestFeatures]) -> list[RequestFeatures]:
    return [dataclasses.replace(f, project="internal-compression") for f in traffic]


def test_flag_only_policy_never_blocks_and_a_deny_policy_does(tmp_path: Path) -> None:
    sweep = project(template_sweep(80, user="eve", key="k-eve", run="sweep"))
    with Store.open(tmp_path / "flag.db") as store:
        admissions = run_traffic(ExtractionMonitor(), store, policy(), sweep)
        assert all(a.decision.allowed for a in admissions)
        flagged = [a for a in admissions if "EXTRACTION_FLAGGED" in a.decision.reasons]
        assert flagged
        entry = flagged[0].entry.body
        assert entry["extra"]["extraction"]["signals"][0]["name"] == "template_sweep"
        assert "evidence" in entry["extra"]["extraction"]["signals"][0]
        assert "Describe" not in json.dumps(entry)  # the prompt text is not logged
    deny = policy(signals={"template_sweep": {"action": "deny"}})
    with Store.open(tmp_path / "deny.db") as store:
        admissions = run_traffic(ExtractionMonitor(deny), store, deny, sweep)
        denied = [a for a in admissions if not a.decision.allowed]
        assert denied and all("EXTRACTION_SUSPECTED" in a.decision.reasons for a in denied)
        assert denied[0].reservation_id is None


def make_log(db: Path, with_attacker: bool) -> None:
    p = policy()
    traffic = project(legit_banking(250, user="alice", key="k-alice", run="gen-1"))
    if with_attacker:
        attack = project(template_sweep(120, user="eve", key="k-eve", run="sweep"))
        traffic = [x for pair in zip(traffic, attack, strict=False) for x in pair] + traffic[len(attack):]
    with Store.open(db) as store:
        run_traffic(ExtractionMonitor(), store, p, traffic)


def test_audit_scan_finds_the_attacker_and_not_the_legitimate_run(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    make_log(db, with_attacker=True)
    from distillgate.extraction.scan import scan_store

    report = scan_store(str(db))
    ids = {(s.scope, s.scope_id) for s in report.sessions}
    assert ("key", "k-eve") in ids and ("user", "eve") in ids
    assert not any("alice" in i or "gen-1" in i for _, i in ids)
    assert report.replayed == 370
    proc = run_cli("audit", "scan", "--db", str(db))
    assert proc.returncode == 2, proc.stderr
    assert "k-eve" in proc.stdout and "template_sweep" in proc.stdout and "near_twins" in proc.stdout
    proc = run_cli("audit", "scan", "--db", str(db), "--json")
    assert json.loads(proc.stdout)["sessions"]


def test_audit_scan_of_a_clean_log_exits_zero(tmp_path: Path) -> None:
    db = tmp_path / "clean.db"
    make_log(db, with_attacker=False)
    proc = run_cli("audit", "scan", "--db", str(db))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 suspicious session(s)" in proc.stdout


def test_audit_scan_of_a_missing_db_says_how_to_fix(tmp_path: Path) -> None:
    proc = run_cli("audit", "scan", "--db", str(tmp_path / "nope.db"))
    assert proc.returncode == 1 and "--db" in (proc.stderr + proc.stdout)


def test_scan_keeps_signals_recorded_live(tmp_path: Path) -> None:
    """Asynchronous signals (prompt_drift) are not recomputable without embeddings: scan reports the logged ones."""
    f = feat("hello there", project="internal-compression")
    drift = Signal("prompt_drift", 0.8, 0.5, 100, "user", "alice", {"outside_reference": 40, "embedded": 50})
    with Store.open(tmp_path / "d.db") as store:
        store.admit(policy(), request(signals=(drift,)), key_id="k", extra=log_extra(f, (drift,)))
    from distillgate.extraction.scan import scan_store

    sessions = scan_store(str(tmp_path / "d.db")).sessions
    assert sessions[0].live and "prompt_drift" in sessions[0].signals
