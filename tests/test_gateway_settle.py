"""``settle: after_reply``: the decision is durable before the answer; the settlement follows right after."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from _gateway_support import running_gateway


def test_after_reply_settles_every_request(tmp_path: Path) -> None:
    with running_gateway(tmp_path, extra_config={"settle": "after_reply"}) as gw:
        body = {"model": "fake-teacher", "messages": [{"role": "user", "content": "hello"}], "n": 2}
        with httpx.Client(base_url=gw.base_url, headers=gw.headers(run="after")) as http:
            answers = [http.post("/chat/completions", json=body) for _ in range(10)]
        assert all(a.status_code == 200 for a in answers)
        assert all(a.json()["distillgate"]["settlement_index"] is None for a in answers)
        decisions = {int(a.headers["x-distillgate-decision"]) for a in answers}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            settled = {e["decision_index"] for e in gw.log() if e["kind"] == "settlement"}
            if decisions <= settled:
                break
            time.sleep(0.05)
        assert decisions <= settled
        assert gw.gateway.store.usage("proj-a", "alice", "after").records_run == 20


def test_a_decision_log_that_cannot_commit_answers_503_and_forwards_nothing(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from distillgate.ledger.store import _Txn
    from distillgate.ledger.verify import verify_db

    real_finish = _Txn.finish
    broken = {"left": 1}

    def finish_fails_once(self: _Txn) -> None:
        if broken["left"]:
            broken["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full (simulated)")
        real_finish(self)

    with running_gateway(tmp_path) as gw:
        body = {"model": "fake-teacher", "messages": [{"role": "user", "content": "hello"}]}
        with httpx.Client(base_url=gw.base_url, headers=gw.headers(run="disk")) as http:
            assert http.post("/chat/completions", json=body).status_code == 200
            seen = len(gw.fake.requests)
            monkeypatch.setattr(_Txn, "finish", finish_fails_once)
            failed = http.post("/chat/completions", json=body)
            assert failed.status_code == 503, failed.text
            error = failed.json()["error"]
            assert error["code"] == "decision_log_unavailable" and "disk is full" in error["message"]
            assert len(gw.fake.requests) == seen  # nothing went to the teacher
            again = http.post("/chat/completions", json=body)
            assert again.status_code == 200
        decisions = [e for e in gw.log() if e["kind"] == "decision" and e["run"] == "disk"]
        assert len(decisions) == 2  # the failed one left no entry
        assert gw.gateway.store.usage("proj-a", "alice", "disk").records_run == 2
    assert verify_db(gw.db).ok
