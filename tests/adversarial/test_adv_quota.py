"""Quotas against prompts built to beat a length estimate, a lying upstream, crashes after admission, long streams."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _adversarial import POLICY, Target, serve_target

from fakes.fake_upstream import Behaviour

QUOTA = 1500
TOOLS = [{"type": "function", "function": {
    "name": f"lookup_{i}", "description": "look it up",
    "parameters": {"type": "object", "properties": {f"p{j}": {"type": "string", "enum": ["a", "b", "c"]}
                                                    for j in range(3)}}}} for i in range(2)]
ATTACKS: dict[str, dict[str, Any]] = {
    "single_letters": {"messages": [{"role": "user", "content": " ".join(["a"] * 400)}]},
    "cjk": {"messages": [{"role": "user", "content": "数据蒸馏" * 60}]},
    "emoji": {"messages": [{"role": "user", "content": "😀🎉🔥" * 40}]},
    "tool_schemas": {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS},
}

@pytest.fixture()
def target(tmp_path: Path) -> Iterator[Target]:
    with serve_target(tmp_path) as t:
        yield t



@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_reservation_is_an_upper_bound_and_granted_never_exceeds_the_quota(tmp_path: Path, attack: str) -> None:
    policy = {**POLICY, "quotas": {"tokens_per_day": QUOTA, "records_per_run": 1000, "default_max_tokens": 8}}
    with serve_target(tmp_path, policy=policy, tokenizer="bytes") as t:
        statuses = [t.chat({**ATTACKS[attack], "max_tokens": 8}).status_code for _ in range(12)]
        assert 200 in statuses and 429 in statuses, statuses  # the quota binds within a dozen requests
        settlements = t.entries("settlement")
        assert settlements and all(s["outcome"] == "ok" for s in settlements)
        # the fake reports worst-case usage; the reservation bounded it every time: nothing overran
        assert all("USAGE_OVERRUN" not in s["reasons"] and s["tokens_refunded"] >= 0 for s in settlements)
        charged = sum(s["tokens_charged"] for s in settlements)
        reported = sum(s["prompt_tokens"] + s["completion_tokens"] for s in settlements)
        assert charged == reported <= QUOTA
        assert t.gateway.store.usage("p", "alice", "r1").tokens_today_project == charged <= QUOTA


def test_usage_above_the_reservation_is_recorded_as_an_overrun_and_not_absorbed(target: Target) -> None:
    target.fake.push(Behaviour.inflate(5000))  # the upstream claims 5,000 tokens more than it produced
    resp = target.chat({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8})
    assert resp.status_code == 200
    decision, settlement = target.entries()[-2:]
    assert "USAGE_OVERRUN" in settlement["reasons"]
    assert settlement["tokens_charged"] == decision["tokens_reserved"]
    reported = settlement["prompt_tokens"] + settlement["completion_tokens"]
    assert settlement["tokens_overrun"] == reported - decision["tokens_reserved"] > 4000
    assert target.gateway.store.usage("p", "alice", "r1").tokens_today_project == decision["tokens_reserved"]


def test_a_body_that_cannot_be_rewritten_is_a_400_before_admission(target: Target) -> None:
    nested: Any = "x"
    for _ in range(300):  # orjson reads 1,024 levels, writes 254
        nested = {"k": nested}
    before = len(target.entries())
    resp = target.chat({"messages": [{"role": "user", "content": "hi"}], "metadata": {"deep": nested}})
    assert resp.status_code == 400, resp.text
    assert "nested too deeply" in resp.json()["error"]["message"]
    assert len(target.entries()) == before and target.held() == 0  # nothing decided, nothing reserved


def test_any_failure_after_admission_settles_at_once_with_the_reason(target: Target) -> None:
    # a broken upstream answer the gateway cannot digest: a failure after admission that is no upstream error
    target.fake.push(Behaviour.answer({"id": "x", "choices": [42], "usage": {"prompt_tokens": 3,
                                                                              "completion_tokens": 2}}))
    resp = target.chat({"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code >= 500
    decision, settlement = target.entries()[-2:]
    assert decision["decision"] == "allow" and settlement["kind"] == "settlement"
    assert settlement["reservation_id"] == decision["reservation_id"]
    assert settlement["outcome"] == "gateway_error" and "GATEWAY_ERROR" in settlement["reasons"]
    assert settlement["extra"]["error"]  # the reason is in the log
    assert target.held() == 0


def test_a_stream_longer_than_the_reservation_ttl_is_stamped_and_charged(tmp_path: Path) -> None:
    with serve_target(tmp_path, reservation_ttl_s=1.0, reclaim_interval_s=0.2,
                      upstream={"timeout_s": 0.5}) as t:
        t.fake.push(Behaviour.slow(0.25))  # ~16 chunks a quarter second apart: about 4 s, four TTLs
        body = {"model": "fake-teacher", "stream": True, "max_tokens": 12,
                "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(12))}]}
        with httpx.stream("POST", t.url + "/v1/chat/completions", json=body, headers=t.headers(),
                          timeout=20) as resp:
            text = resp.read().decode()
        assert resp.status_code == 200
        assert text.rstrip().endswith("data: [DONE]") and '"stamp"' in text
        assert not t.entries("reclaim")
        settlement = t.entries("settlement")[-1]
        assert settlement["outcome"] == "ok" and settlement["tokens_charged"] > 0
        assert t.held() == 0
