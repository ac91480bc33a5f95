"""Helpers of the adversarial suite: a real gateway (uvicorn on loopback, built by ``build_gateway`` from a gateway config as
``gateway serve`` builds it) in front of the fake teacher, attacked over real HTTP (httpx and raw sockets).

Each test reproduces one way a hostile user or a careless operator broke a promise of docs/reliability.md (issue
17) and fails on the code before its fix.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _gateway_support import free_port, serve_in_thread, write_policies
from distillgate.gateway.app import Gateway
from distillgate.gateway.config import config_from_data
from distillgate.gateway.server import build_gateway
from distillgate.keys import KeyStore

from fakes.fake_upstream import FakeUpstream, fake_upstream

POLICY: dict[str, Any] = {
    "policy_id": "adv",
    "allowed_projects": ["p"],
    "allowed_outputs": ["summaries", "labels"],
    "quotas": {"tokens_per_day": 1_000_000, "records_per_run": 100_000, "default_max_tokens": 16},
    "approved_models": ["fake-teacher", "local/*"],
    "audit": {"log_content": True},
}


@dataclass
class Target:
    url: str
    gateway: Gateway
    fake: FakeUpstream
    db: Path
    key: str

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "X-Policy-User": "alice", "X-Policy-Project": "p",
                "X-Policy-Run": "r1", "X-Policy-Output-Type": "summaries", **extra}

    def chat(self, body: dict[str, Any], *, timeout: float = 20.0, **headers: str) -> httpx.Response:
        full = {"model": "fake-teacher", **body}
        return httpx.post(self.url + "/v1/chat/completions", json=full, headers=self.headers(**headers),
                          timeout=timeout)

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e.body for e in self.gateway.store.entries(kind=kind)]

    def held(self) -> int:
        rows = self.gateway.store._reader().execute("SELECT COUNT(*) FROM reservations WHERE state='held'")
        return int(rows.fetchone()[0])


@contextlib.contextmanager
def serve_target(tmp: Path, *, policy: dict[str, Any] | None = None, tokenizer: str = "words",
                 http: Any = "httptools", **config: Any) -> Iterator[Target]:
    policy_dir = write_policies(tmp / "policies", policy or POLICY)
    db = tmp / "gw.db"
    keys = KeyStore(db)
    key = keys.create("alice")[1]
    keys.close()
    with fake_upstream(tokenizer=tokenizer) as fake:
        upstream = {"base_url": fake.base_url, "max_retries": 0, "timeout_s": 5.0, "max_backoff_s": 0.1}
        upstream.update(config.pop("upstream", {}))
        data: dict[str, Any] = {"policy": str(policy_dir), "db": str(db), "upstreams": {"fake": upstream},
                                "models": {"fake-teacher": "fake"}, "reclaim_interval_s": 0.3,
                                "reservation_ttl_s": 30.0, **config}
        gateway = build_gateway(config_from_data(data))
        port = free_port()
        try:
            with serve_in_thread(gateway, port, http=http):
                yield Target(f"http://127.0.0.1:{port}", gateway, fake, db, key)
        finally:
            gateway.store.close()
            gateway.keys.close()


def raw_request(url: str, head: bytes, body: bytes = b"", *, wait_s: float = 10.0) -> bytes:
    """Send ``head`` (and ``body``) on a fresh socket; return what came back before close or ``wait_s``."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(head + body)
        chunks: list[bytes] = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False
