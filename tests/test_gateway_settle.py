"""``settle: after_reply``: the decision is durable before the answer; the settlement follows right after."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

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
