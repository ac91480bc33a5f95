"""Start a real gateway (uvicorn on a loopback port, in a thread) in front of the fake teacher, for tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from distillgate.gateway.app import Gateway
from distillgate.gateway.config import config_from_data
from distillgate.gateway.server import build_gateway
from distillgate.keys import KeyStore

from fakes.fake_upstream import FakeUpstream, fake_upstream

MAIN_POLICY: dict[str, Any] = {
    "policy_id": "research",
    "allowed_projects": ["proj-a", "proj-b"],
    "allowed_outputs": ["labels", "summaries", "json_records"],
    "blocked_outputs": ["third_party_model_extraction", "credentialed_api_replication"],
    "quotas": {"tokens_per_day": 1_000_000, "records_per_run": 1000, "default_max_tokens": 64},
    "project_users": {"proj-b": ["bob"]},
    "approved_models": ["fake-teacher", "fake-teacher-large", "other/*"],
    "output_contracts": {
        "labels": {"labels": ["card_lost", "top_up_failed"], "enforcement": "block"},
        "json_records": {"json_schema": {"type": "object", "required": ["intent"],
                                         "properties": {"intent": {"type": "string"}}}, "enforcement": "flag"},
    },
    "hardening": {"max_top_logprobs": 5, "round_logprobs": 2},
    "audit": {"log_content": True},
}

TINY_POLICY: dict[str, Any] = {
    "policy_id": "tiny",
    "allowed_projects": ["tiny"],
    "allowed_outputs": ["summaries"],
    # the reservation bounds a prompt by its body's bytes (docs/reliability.md): 400 admits one ~150-token ask
    "quotas": {"tokens_per_day": 400, "records_per_run": 3, "default_max_tokens": 16},
    "approved_models": ["fake-teacher"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    gateway: Gateway
    fake: FakeUpstream
    db: Path
    keys: dict[str, str]  # user -> API key

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def headers(self, user: str = "alice", project: str = "proj-a", run: str = "run-1",
                output_type: str = "summaries") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}", "X-Policy-User": user, "X-Policy-Project": project,
                "X-Policy-Run": run, "X-Policy-Output-Type": output_type}

    def log(self) -> list[dict[str, Any]]:
        return [e.body | {"index": e.index} for e in self.gateway.store.entries()]


def write_policies(directory: Path, *policies: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for p in policies:
        (directory / f"{p['policy_id']}.json").write_text(json.dumps(p))
    return directory


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int, *, http: Any = "httptools") -> Iterator[uvicorn.Server]:
    """``http``: uvicorn's protocol (a name or a class, e.g. ``gateway_protocol(n)`` as ``gateway serve`` runs)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http=http, lifespan="on",
                            access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(20)


@contextlib.contextmanager
def running_gateway(tmp: Path, *, extra_config: dict[str, Any] | None = None,
                    users: tuple[str, ...] = ("alice", "bob", "carol")) -> Iterator[Running]:
    policy_dir = write_policies(tmp / "policies", MAIN_POLICY, TINY_POLICY)
    db = tmp / "gw.db"
    keystore = KeyStore(db)
    keys = {u: keystore.create(u)[1] for u in users}
    keystore.close()
    with fake_upstream() as fake:
        data: dict[str, Any] = {"policy": str(policy_dir), "db": str(db),
                                "upstreams": {"fake": {"base_url": fake.base_url, "max_retries": 2,
                                                       "backoff_s": 0.01, "timeout_s": 2.0}},
                                "reclaim_interval_s": 0.5}
        for key, value in (extra_config or {}).items():
            if key == "upstreams" and value is None:  # a second upstream on the same fake
                data["upstreams"]["other"] = dict(data["upstreams"]["fake"])
            else:
                data[key] = value
        gateway = build_gateway(config_from_data(data))
        port = free_port()
        try:
            with serve_in_thread(gateway, port):
                yield Running(f"http://127.0.0.1:{port}", gateway, fake, db, keys)
        finally:
            gateway.store.close()
            gateway.keys.close()
