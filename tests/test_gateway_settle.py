"""``settle: after_reply``: the decision is durable before the answer; the settlement follows right after."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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


def test_a_decision_log_that_cannot_commit_answers_503_and_leaves_no_entry(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
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
            assert not [r for r in caplog.records if "internal error" in r.getMessage()]  # a 503, not a bug
            # the admission was answered early, before its commit (one commit per request, ledger/writer.py): the
            # request went to the teacher, but its answer did not go out, nor did anything of it reach the log
            assert len(gw.fake.requests) == seen + 1
            # the same keep-alive connection: a failed settlement commit is a 503, not an internal error that
            # closes the connection
            again = http.post("/chat/completions", json=body)
            assert again.status_code == 200
        decisions = [e for e in gw.log() if e["kind"] == "decision" and e["run"] == "disk"]
        assert len(decisions) == 2  # the failed one left no entry
        assert gw.gateway.store.usage("proj-a", "alice", "disk").records_run == 2
    assert verify_db(gw.db).ok


@pytest.mark.parametrize("settle", ["before_reply", "after_reply"])
def test_no_answer_precedes_the_commit_of_its_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       settle: str) -> None:
    """Every response that names a decision (allowed, streamed, denied, upstream failure) starts only once that
    decision is committed, although the admission is answered early (before its commit) and the transaction is
    held open for its settlement: each commit is slowed down, so an answer that did not wait would overtake it."""
    import sqlite3

    from distillgate.gateway import http as gateway_http
    from distillgate.ledger.store import _Txn

    from fakes.fake_upstream import Behaviour

    real_finish = _Txn.finish

    def slow_finish(self: _Txn) -> None:
        real_finish(self)
        time.sleep(0.05)  # COMMIT comes late

    monkeypatch.setattr(_Txn, "finish", slow_finish)
    seen: list[tuple[int, int, bool]] = []
    real_init = gateway_http.Responder.__init__

    def checking_init(self: gateway_http.Responder, send: Any) -> None:
        async def checked(message: Any) -> None:
            if message["type"] == "http.response.start":
                names = dict(message["headers"])
                if b"x-distillgate-decision" in names:
                    index = int(names[b"x-distillgate-decision"])
                    conn = sqlite3.connect(db)
                    committed = conn.execute("SELECT 1 FROM log WHERE idx=?", (index,)).fetchone() is not None
                    conn.close()
                    seen.append((message["status"], index, committed))
            await send(message)

        real_init(self, checked)

    monkeypatch.setattr(gateway_http.Responder, "__init__", checking_init)
    with running_gateway(tmp_path, extra_config={"settle": settle}) as gw:
        db = gw.db
        body = {"model": "fake-teacher", "messages": [{"role": "user", "content": "hello"}]}
        with httpx.Client(base_url=gw.base_url, headers=gw.headers(run="gate")) as http:
            for _ in range(3):
                assert http.post("/chat/completions", json=body).status_code == 200
            assert http.post("/chat/completions", json={**body, "stream": True}).status_code == 200
            denied = http.post("/chat/completions", json=body, headers=gw.headers(project="nope"))
            assert denied.status_code == 403
            gw.fake.push(Behaviour.status_error(400))
            assert http.post("/chat/completions", json=body).status_code >= 400
    statuses = sorted(status for status, _, _ in seen)
    assert len(seen) == 6 and statuses[:4] == [200] * 4 and 403 in statuses, seen
    assert all(committed for _, _, committed in seen), seen
