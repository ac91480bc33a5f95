"""`extraction.process: true`: the extraction monitor in a child process -- its life with the gateway's.

What the monitor decides is the same in both modes: tests/test_gateway_extraction.py runs each of its gateway
tests with the monitor in the gateway's process and in its own.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from _gateway_support import free_port, serve_in_thread
from _reliability_support import log_bodies, start, stop, write_config
from distillgate.extraction.process import MonitorProcess
from distillgate.gateway.config import load_config
from distillgate.gateway.server import build_gateway
from distillgate.keys import KeyStore

from fakes.fake_upstream import fake_upstream

POLICY: dict[str, Any] = {"policy_id": "open", "allowed_projects": ["q"], "allowed_outputs": ["summaries"],
                          "quotas": {"default_max_tokens": 4}}
BODY = {"model": "fake-teacher", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4}


def key_for(db: Path) -> str:
    ks = KeyStore(db)
    try:
        return ks.create("alice")[1]
    finally:
        ks.close()


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Policy-User": "alice", "X-Policy-Project": "q",
            "X-Policy-Run": "r1", "X-Policy-Output-Type": "summaries"}


def monitor_children(parent: int) -> list[int]:
    """Pids of the extraction monitor processes whose parent is ``parent`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"distillgate.extraction.process" in cmdline:
            out.append(int(entry))
    return out


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, not yet reaped by its (dead) parent's reaper
            return True
        time.sleep(0.05)
    return False


def test_a_killed_monitor_process_costs_at_most_one_503_then_is_restarted(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    key = key_for(db)
    with fake_upstream(reply="ok") as fake:
        gateway = build_gateway(load_config(write_config(tmp_path, db, fake.base_url, policies=(POLICY,),
                                                         extraction={"process": True})))
        monitor = gateway.monitor
        assert isinstance(monitor, MonitorProcess)
        port = free_port()
        try:
            with serve_in_thread(gateway, port), httpx.Client(base_url=f"http://127.0.0.1:{port}/v1") as client:
                assert client.post("/chat/completions", headers=headers(key), json=BODY).status_code == 200
                assert monitor._proc is not None
                first = monitor._proc.pid
                os.kill(first, signal.SIGKILL)
                statuses = [client.post("/chat/completions", headers=headers(key), json=BODY) for _ in range(4)]
                assert monitor._proc is not None
                second = monitor._proc.pid
        finally:
            gateway.store.close()
            gateway.keys.close()
    codes = [r.status_code for r in statuses]
    assert codes.count(503) <= 1 and codes[-3:] == [200, 200, 200], codes
    for r in statuses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "extraction_monitor_unavailable"
    assert monitor.restarts == 1 and second != first
    decisions = [b for b in log_bodies(db) if b["kind"] == "decision"]
    assert len(decisions) == 1 + codes.count(200)  # a 503 decided nothing and logged nothing
    assert all("features" in b["extra"]["extraction"] for b in decisions)


def test_the_monitor_process_ends_with_the_gateway_even_when_it_is_sigkilled(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    key = key_for(db)
    with fake_upstream(reply="ok") as fake:
        config = write_config(tmp_path, db, fake.base_url, policies=(POLICY,), extraction={"process": True})
        for sig in (signal.SIGTERM, signal.SIGKILL):
            gp = start(config, tmp_path)
            try:
                r = httpx.post(gp.url + "/v1/chat/completions", headers=headers(key), json=BODY, timeout=30)
                assert r.status_code == 200, r.text
                children = monitor_children(gp.proc.pid)
                assert len(children) == 1
            finally:
                stop(gp, sig)
            assert gone(children[0]), f"the monitor process outlived a gateway stopped by {sig!r}"


def test_a_monitor_process_is_not_started_on_policies_that_changed_under_the_gateway(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    key = key_for(db)
    with fake_upstream(reply="ok") as fake:
        config = load_config(write_config(tmp_path, db, fake.base_url, policies=(POLICY,),
                                          extraction={"process": True}))
        gateway = build_gateway(config)  # the child starts on the first request, from the files
        (tmp_path / "policies" / "open.json").write_text(json.dumps({**POLICY, "quotas": {"default_max_tokens": 5}}))
        port = free_port()
        try:
            with serve_in_thread(gateway, port), httpx.Client(base_url=f"http://127.0.0.1:{port}/v1") as client:
                r = client.post("/chat/completions", headers=headers(key), json=BODY)
                again = client.post("/chat/completions", headers=headers(key), json=BODY)
                assert isinstance(gateway.monitor, MonitorProcess)
                assert gateway.monitor.starts == 1  # refused once, not a new child per request
                assert not monitor_children(os.getpid())
        finally:
            gateway.store.close()
            gateway.keys.close()
    for resp in (r, again):
        assert resp.status_code == 503 and "changed since the gateway started" in resp.json()["error"]["message"]
    assert not [b for b in log_bodies(db) if b["kind"] == "decision"]
