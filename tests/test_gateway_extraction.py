"""The gateway runs the extraction monitor on every request; the policy decides what a fired signal does."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx

from _gateway_support import free_port, serve_in_thread, write_policies
from distillgate.gateway.config import config_from_data
from distillgate.gateway.keys import KeyStore
from distillgate.gateway.server import build_gateway

from fakes.fake_upstream import fake_upstream


def policy(action: str) -> dict[str, Any]:
    return {"policy_id": f"extraction-{action}", "allowed_projects": ["p"], "allowed_outputs": ["labels"],
            "quotas": {"default_max_tokens": 4},
            "extraction": {"signals": {"logit_bias_sweep": {"action": action}}}}


def probe(tmp: Path, action: str) -> tuple[list[int], list[dict[str, Any]]]:
    db = tmp / f"{action}.db"
    keys = KeyStore(db)
    secret = keys.create("mallory")[1]
    keys.close()
    statuses = []
    with fake_upstream(reply="ok") as fake:
        gateway = build_gateway(config_from_data({
            "policy": str(write_policies(tmp / action, policy(action))), "db": str(db),
            "upstreams": {"fake": {"base_url": fake.base_url}}}))
        port = free_port()
        try:
            with serve_in_thread(gateway, port), httpx.Client(base_url=f"http://127.0.0.1:{port}/v1") as client:
                for token in range(40):  # Carlini-style: one biased token per query, swept over the vocabulary
                    r = client.post("/chat/completions", headers={
                        "Authorization": f"Bearer {secret}", "X-Policy-User": "mallory", "X-Policy-Project": "p",
                        "X-Policy-Run": "r", "X-Policy-Output-Type": "labels"},
                        json={"model": "fake-teacher", "max_tokens": 1, "logprobs": True, "top_logprobs": 5,
                              "logit_bias": {str(1000 + token): 100},
                              "messages": [{"role": "user", "content": "Say one word."}]})
                    statuses.append(r.status_code)
        finally:
            gateway.store.close()
            gateway.keys.close()
    conn = sqlite3.connect(db)
    bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM log WHERE kind='decision' ORDER BY idx")]
    conn.close()
    return statuses, bodies


def test_deny_policy_blocks_a_logit_bias_sweep_with_evidence(tmp_path: Path) -> None:
    statuses, bodies = probe(tmp_path, "deny")
    assert statuses[:5] == [200] * 5 and statuses[-1] == 403
    denied = [b for b in bodies if "EXTRACTION_SUSPECTED" in b["reasons"]]
    assert denied and all(b["decision"] == "deny" for b in denied)
    signals = denied[0]["extra"]["extraction"]["signals"]
    assert any(s["name"] == "logit_bias_sweep" and s["value"] >= s["threshold"] for s in signals)
    assert "prompt" not in json.dumps(denied[0]["extra"]["extraction"]["features"])  # a sketch, never the text


def test_flag_only_policy_never_blocks(tmp_path: Path) -> None:
    statuses, bodies = probe(tmp_path, "flag")
    assert statuses == [200] * 40
    flagged = [b for b in bodies if "EXTRACTION_FLAGGED" in b["reasons"]]
    assert flagged and all(b["decision"] == "allow" for b in flagged)
