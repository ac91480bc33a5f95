"""The gateway runs the extraction monitor on every request; the policy decides what a fired signal does."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from _extraction_support import BANK_TEMPLATE, banking_texts, coverage_prompts
from _gateway_support import free_port, serve_in_thread, write_policies
from distillgate.errors import ConfigError
from distillgate.extraction import HashingEmbedder
from distillgate.extraction.local import LocalMonitor
from distillgate.gateway.config import config_from_data
from distillgate.gateway.server import build_gateway
from distillgate.keys import KeyStore

from fakes.fake_upstream import fake_upstream


def policy(action: str) -> dict[str, Any]:
    return {"policy_id": f"extraction-{action}", "allowed_projects": ["p"], "allowed_outputs": ["labels"],
            "quotas": {"default_max_tokens": 4},
            "extraction": {"signals": {"logit_bias_sweep": {"action": action}}}}


def decision_bodies(db: Path) -> list[dict[str, Any]]:
    """Every decision entry's body in the gateway's log, in log order."""
    conn = sqlite3.connect(db)
    try:
        return [json.loads(b) for (b,) in conn.execute("SELECT body FROM log WHERE kind='decision' ORDER BY idx")]
    finally:
        conn.close()


def probe(tmp: Path, action: str, process: bool = False) -> tuple[list[int], list[dict[str, Any]]]:
    db = tmp / f"{action}.db"
    keys = KeyStore(db)
    secret = keys.create("mallory")[1]
    keys.close()
    statuses = []
    with fake_upstream(reply="ok") as fake:
        gateway = build_gateway(config_from_data({
            "policy": str(write_policies(tmp / action, policy(action))), "db": str(db),
            "upstreams": {"fake": {"base_url": fake.base_url}}, "extraction": {"process": process}}))
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
    return statuses, decision_bodies(db)


# every behaviour holds with the monitor in the gateway's process and in its own (extraction.process: true)
MODES = pytest.mark.parametrize("process", [False, True], ids=["in-process", "monitor-process"])


@MODES
def test_deny_policy_blocks_a_logit_bias_sweep_with_evidence(tmp_path: Path, process: bool) -> None:
    statuses, bodies = probe(tmp_path, "deny", process)
    assert statuses[:5] == [200] * 5 and statuses[-1] == 403
    denied = [b for b in bodies if "EXTRACTION_SUSPECTED" in b["reasons"]]
    assert denied and all(b["decision"] == "deny" for b in denied)
    signals = denied[0]["extra"]["extraction"]["signals"]
    assert any(s["name"] == "logit_bias_sweep" and s["value"] >= s["threshold"] for s in signals)
    assert "prompt" not in json.dumps(denied[0]["extra"]["extraction"]["features"])  # a sketch, never the text


@MODES
def test_flag_only_policy_never_blocks(tmp_path: Path, process: bool) -> None:
    statuses, bodies = probe(tmp_path, "flag", process)
    assert statuses == [200] * 40
    flagged = [b for b in bodies if "EXTRACTION_FLAGGED" in b["reasons"]]
    assert flagged and all(b["decision"] == "allow" for b in flagged)


# -- the gateway's embedder and per-project references (gateway config `extraction`) ----------------------------

BANK = "bank"


def drift_policy(record_embeddings: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"policy_id": "drift", "allowed_projects": [BANK], "allowed_outputs": ["labels"],
                           "quotas": {"default_max_tokens": 8}}
    if record_embeddings:
        doc["extraction"] = {"record_embeddings": True}
    return doc


def reference_file(tmp: Path, n: int = 400) -> Path:
    path = tmp / "approved.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": BANK_TEMPLATE.format(t)}]})
             for t in banking_texts()[:n]]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_extraction_config_gives_the_monitor_an_embedder_and_references(tmp_path: Path) -> None:
    ref = reference_file(tmp_path, 50)
    text_ref = tmp_path / "approved.txt"
    text_ref.write_text("\n".join(banking_texts()[:30]) + "\n\n")
    policies = write_policies(tmp_path / "policies", drift_policy())
    gateway = build_gateway(config_from_data({
        "policy": str(policies), "db": str(tmp_path / "gw.db"),
        "extraction": {"embedder": "hashing", "references": {BANK: str(ref), "other": str(text_ref)},
                       "embed_cache": 16}}))
    try:
        assert isinstance(gateway.monitor, LocalMonitor)  # in process: the seam over an ExtractionMonitor
        monitor = gateway.monitor.monitor
        assert isinstance(monitor.embedder, HashingEmbedder) and monitor.embed_cache == 16
        bank, other = monitor.reference(BANK), monitor.reference("other")
        assert bank is not None and len(bank.vectors) == 50 and other is not None and len(other.vectors) == 30
        assert monitor.reference("elsewhere") is None
    finally:
        gateway.store.close()
        gateway.keys.close()
    default = config_from_data({"policy": str(policies)})
    assert default.extraction.embedder == "none"
    with pytest.raises(ConfigError) as err:  # every problem at once, each with its path
        config_from_data({"policy": str(policies),
                          "extraction": {"references": {BANK: str(tmp_path / "missing.jsonl")}}})
    paths = {issue.path for issue in err.value.issues}
    assert paths == {"extraction.references", f"extraction.references.{BANK}"}
    with pytest.raises(ConfigError):
        config_from_data({"policy": str(policies), "extraction": {"embedder": "bert"}})


def replay_over_http(tmp: Path, embedder: str, requests: int = 80, record_embeddings: bool = False,
                     process: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Alice sends banking prompts (none in the reference), mallory off-domain ones, interleaved, each request
    over HTTP; returns each user's decision-log bodies in order."""
    db = tmp / "drift.db"
    keys = KeyStore(db)
    secrets = {user: keys.create(user)[1] for user in ("alice", "mallory")}
    keys.close()
    legit = [BANK_TEMPLATE.format(t) for t in banking_texts("test")[:requests]]
    prompts = {"alice": legit, "mallory": coverage_prompts(requests)}
    extraction: dict[str, Any] = {"embedder": embedder, "process": process}
    if embedder != "none":
        extraction["references"] = {BANK: str(reference_file(tmp))}
    with fake_upstream(reply="card_lost") as fake:
        gateway = build_gateway(config_from_data({
            "policy": str(write_policies(tmp / "policies", drift_policy(record_embeddings))), "db": str(db),
            "upstreams": {"fake": {"base_url": fake.base_url}}, "extraction": extraction}))
        port = free_port()
        try:
            with serve_in_thread(gateway, port), httpx.Client(base_url=f"http://127.0.0.1:{port}/v1") as client:
                for i in range(requests):
                    for user in ("alice", "mallory"):
                        r = client.post("/chat/completions", headers={
                            "Authorization": f"Bearer {secrets[user]}", "X-Policy-Project": BANK,
                            "X-Policy-Run": f"run-{user}", "X-Policy-Output-Type": "labels"},
                            json={"model": "fake-teacher", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": prompts[user][i]}]})
                        assert r.status_code == 200, r.text
                    if i % 10 == 9:  # let the background embedder catch up, as a paced client would
                        gateway.monitor.drain()
            assert gateway.monitor.status().dropped == 0
        finally:
            gateway.store.close()
            gateway.keys.close()
    bodies = decision_bodies(db)
    return {user: [b for b in bodies if b["user"] == user] for user in ("alice", "mallory")}


def drift_positions(entries: list[dict[str, Any]]) -> list[int]:
    return [i for i, b in enumerate(entries)
            if any(s["name"] == "prompt_drift" for s in b["extra"]["extraction"]["signals"])]


@MODES
def test_gateway_with_an_embedder_records_drift_for_an_off_domain_session(tmp_path: Path, process: bool) -> None:
    by_user = replay_over_http(tmp_path, "hashing", process=process)
    alice, mallory = by_user["alice"], by_user["mallory"]
    assert len(alice) == len(mallory) == 80
    assert not [b for b in alice if b["extra"]["extraction"]["signals"]]  # in-domain: nothing fires
    hits = drift_positions(mallory)
    assert hits and hits[0] < 40  # fires once 20 prompts are embedded, on the session's following requests
    first = mallory[hits[0]]
    assert first["decision"] == "allow" and "EXTRACTION_FLAGGED" in first["reasons"]
    drift = next(s for s in first["extra"]["extraction"]["signals"] if s["name"] == "prompt_drift")
    assert drift["value"] >= drift["threshold"] and drift["evidence"]["outside_reference"] >= 10


@MODES
def test_record_embeddings_puts_a_quantised_prompt_embedding_in_every_decision(tmp_path: Path, process: bool) -> None:
    by_user = replay_over_http(tmp_path, "hashing", requests=12, record_embeddings=True, process=process)
    entries = by_user["alice"] + by_user["mallory"]
    assert len(entries) == 24
    vectors = [b["extra"]["extraction"]["features"]["embedding"] for b in entries]
    assert all(v is not None for v in vectors)
    assert len({json.dumps(v) for v in vectors}) == 24  # one per prompt, not a constant
    (tmp_path / "plain").mkdir()
    plain = replay_over_http(tmp_path / "plain", "hashing", requests=4)  # the policy's default: no embedding
    assert all("embedding" not in b["extra"]["extraction"]["features"] for b in plain["alice"])


def test_gateway_without_an_embedder_never_records_drift(tmp_path: Path) -> None:
    by_user = replay_over_http(tmp_path, "none", requests=40)
    assert not drift_positions(by_user["mallory"]) and not drift_positions(by_user["alice"])


@pytest.mark.slow
def test_gateway_with_minilm_records_drift_for_an_off_domain_session(tmp_path: Path) -> None:
    by_user = replay_over_http(tmp_path, "minilm")
    assert not drift_positions(by_user["alice"])
    hits = drift_positions(by_user["mallory"])
    assert hits and hits[0] < 40


def test_a_declared_run_size_drives_the_volume_signal_over_http(tmp_path: Path) -> None:
    """X-Policy-Run-Size (or metadata.policy_run_size) is the run's declared size: past 1.2x of it, `volume` fires."""
    db = tmp_path / "volume.db"
    keys = KeyStore(db)
    secret = keys.create("alice")[1]
    keys.close()
    pol = {"policy_id": "volume", "allowed_projects": ["p"], "allowed_outputs": ["labels"],
           "quotas": {"default_max_tokens": 4}, "extraction": {"signals": {"volume": {"action": "flag"}}}}
    headers = {"Authorization": f"Bearer {secret}", "X-Policy-User": "alice", "X-Policy-Project": "p",
               "X-Policy-Run": "r", "X-Policy-Output-Type": "labels"}
    texts = banking_texts()
    with fake_upstream(reply="ok") as fake:
        gateway = build_gateway(config_from_data({"policy": str(write_policies(tmp_path / "pol", pol)), "db": str(db),
                                                  "upstreams": {"fake": {"base_url": fake.base_url}}}))
        port = free_port()
        try:
            with serve_in_thread(gateway, port), httpx.Client(base_url=f"http://127.0.0.1:{port}/v1") as client:
                for i in range(8):  # declared 5 records; the 6th request makes 6 / 5 = 1.2
                    extra: dict[str, Any] = ({"headers": {**headers, "X-Policy-Run-Size": "5"}} if i % 2 else
                                             {"headers": headers})
                    body: dict[str, Any] = {"model": "fake-teacher", "max_tokens": 2,
                                            "messages": [{"role": "user", "content": BANK_TEMPLATE.format(texts[i])}]}
                    if not i % 2:
                        body["metadata"] = {"policy_run_size": 5, "trace": "kept"}
                    assert client.post("/chat/completions", json=body, **extra).status_code == 200
                bad = [client.post("/chat/completions", headers={**headers, "X-Policy-Run-Size": value},
                                   json={"model": "fake-teacher", "messages": [{"role": "user", "content": "hi"}]})
                       for value in ("0", "-3", "many", "1.5", str(10**10))]
                bad.append(client.post("/chat/completions", headers=headers, json={
                    "model": "fake-teacher", "messages": [{"role": "user", "content": "hi"}],
                    "metadata": {"policy_run_size": True}}))
            forwarded = [q["body"].get("metadata") for q in fake.requests]
        finally:
            gateway.store.close()
            gateway.keys.close()
    assert [r.status_code for r in bad] == [400] * 6
    assert all("X-Policy-Run-Size" in r.json()["error"]["message"] for r in bad)
    assert forwarded[:8] == [{"trace": "kept"}, None] * 4  # the size is stripped before forwarding
    bodies = decision_bodies(db)[:8]
    assert [b["extra"]["extraction"]["features"]["declared_run_size"] for b in bodies] == [5] * 8
    fired = ["volume" in {s["name"] for s in b["extra"]["extraction"]["signals"]} for b in bodies]
    assert fired == [False] * 5 + [True] * 3


class _Gated:
    """An embedder that answers only once ``go`` is set (a model still loading, or one that cannot keep up)."""

    dim = 8

    def __init__(self) -> None:
        import threading

        self.go = threading.Event()

    def embed(self, texts: Any) -> Any:
        import numpy as np

        self.go.wait(20)
        out = np.zeros((len(texts), 8), dtype=np.float32)
        out[:, 0] = 1.0
        return out


def test_healthz_is_ready_only_with_the_monitor_and_an_unembedded_request_is_recorded_unobserved(
        tmp_path: Path) -> None:
    from distillgate.extraction import ExtractionMonitor
    from distillgate.policy import load_policies

    db = tmp_path / "ready.db"
    keys = KeyStore(db)
    secret = keys.create("alice")[1]
    keys.close()
    policies_dir = write_policies(tmp_path / "policies", drift_policy())
    embedder = _Gated()
    with fake_upstream(reply="ok") as fake:
        gateway = build_gateway(config_from_data({
            "policy": str(policies_dir), "db": str(db), "upstreams": {"fake": {"base_url": fake.base_url}}}))
        gateway.monitor = LocalMonitor(ExtractionMonitor(load_policies(policies_dir), embedder=embedder,
                                                         queue_size=1), embed_wait_s=0.05)
        port = free_port()
        try:
            with serve_in_thread(gateway, port):
                health = httpx.get(f"http://127.0.0.1:{port}/healthz")
                assert health.status_code == 503 and health.json()["status"] == "starting"
                embedder.go.set()  # the model is loaded: the warm-up returns, the monitor is ready
                for _ in range(200):
                    if (health := httpx.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                    import time

                    time.sleep(0.05)
                assert health.status_code == 200 and health.json()["monitor_ready"] is True
                embedder.go.clear()  # now it stalls: the queue (1 job) fills
                with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1") as client:
                    for i in range(4):
                        r = client.post("/chat/completions", headers={
                            "Authorization": f"Bearer {secret}", "X-Policy-Project": BANK, "X-Policy-Run": "r",
                            "X-Policy-Output-Type": "labels"},
                            json={"model": "fake-teacher", "messages": [{"role": "user", "content": f"q {i}"}]})
                        assert r.status_code == 200
                dropped = gateway.monitor.status().dropped
                embedder.go.set()
        finally:
            gateway.store.close()
            gateway.keys.close()
    extras = [b["extra"]["extraction"] for b in decision_bodies(db)]
    unobserved = [e for e in extras if e.get("unobserved") == "embed_backlog"]
    assert unobserved and len(unobserved) == dropped, "an unembedded request was not recorded in its entry"
