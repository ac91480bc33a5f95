"""teachers/http.py against the fake teacher over real HTTP: pooling, retries with backoff, timeouts, streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from distillgate.errors import ConfigError, UpstreamError
from distillgate.teachers.http import HttpTeacher, HttpUpstreamConfig

from fakes.fake_upstream import Behaviour, FakeUpstream, fake_upstream

BODY = {"model": "fake-teacher", "messages": [{"role": "user", "content": "hi there"}]}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as server:
        yield server


@pytest.fixture(autouse=True)
def _clear(fake: FakeUpstream) -> None:
    fake.clear()


def teacher(fake: FakeUpstream, **kw: object) -> HttpTeacher:
    cfg = {"name": "fake", "base_url": fake.base_url, "backoff_s": 0.01, "timeout_s": 1.0, **kw}
    return HttpTeacher(HttpUpstreamConfig(**cfg))  # type: ignore[arg-type]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_chat_completion_and_api_key_from_env(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TEACHER_KEY", "sk-test-123")

    async def go() -> dict:
        t = teacher(fake, api_key_env="FAKE_TEACHER_KEY")
        try:
            return await t.chat_completion(BODY)
        finally:
            await t.aclose()

    out = run(go())
    assert out["choices"][0]["message"]["content"] == "Echo: hi there"
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer sk-test-123"


def test_missing_key_env_is_a_config_error(fake: FakeUpstream) -> None:
    with pytest.raises(ConfigError) as info:
        teacher(fake, api_key_env="DISTILLGATE_SURELY_UNSET_VAR", base_url="ftp://x")
    text = str(info.value)
    assert "DISTILLGATE_SURELY_UNSET_VAR" in text and "base_url" in text  # every problem, not just the first


def test_retries_on_429_5xx_and_reset_then_succeeds(fake: FakeUpstream) -> None:
    fake.push(Behaviour.status_error(429, retry_after=0.05), Behaviour.status_error(503), Behaviour.reset())

    async def go() -> dict:
        t = teacher(fake, max_retries=3)
        try:
            return await t.chat_completion(BODY)
        finally:
            await t.aclose()

    started = time.monotonic()
    out = run(go())
    assert out["choices"][0]["message"]["content"] == "Echo: hi there"
    assert fake.served == 4
    assert time.monotonic() - started >= 0.05  # Retry-After was honoured


def test_gives_up_after_max_retries_with_status(fake: FakeUpstream) -> None:
    fake.push(*[Behaviour.status_error(502)] * 3)

    async def go() -> None:
        t = teacher(fake, max_retries=1)
        try:
            await t.chat_completion(BODY)
        finally:
            await t.aclose()

    with pytest.raises(UpstreamError) as info:
        run(go())
    assert info.value.status == 502 and fake.served == 2


def test_client_errors_are_not_retried(fake: FakeUpstream) -> None:
    fake.push(Behaviour.status_error(400))

    async def go() -> None:
        t = teacher(fake, max_retries=3)
        try:
            await t.chat_completion(BODY)
        finally:
            await t.aclose()

    with pytest.raises(UpstreamError) as info:
        run(go())
    assert info.value.status == 400 and fake.served == 1


def test_stall_times_out_without_retry(fake: FakeUpstream) -> None:
    fake.push(Behaviour.stall(2.0))

    async def go() -> None:
        t = teacher(fake, timeout_s=0.3, max_retries=3)
        try:
            await t.chat_completion(BODY)
        finally:
            await t.aclose()

    with pytest.raises(UpstreamError) as info:
        run(go())
    assert info.value.status == 504 and fake.served == 1


def test_stream_yields_chunks_with_usage_and_detects_a_cut(fake: FakeUpstream) -> None:
    async def go() -> list[dict]:
        t = teacher(fake)
        try:
            return [c async for c in t.stream_chat_completion(BODY)]
        finally:
            await t.aclose()

    chunks = run(go())
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Echo: hi there"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    fake.push(Behaviour.cut(after_chunks=2))
    with pytest.raises(UpstreamError, match="stream broke"):
        run(go())


def test_stream_retries_before_the_first_byte(fake: FakeUpstream) -> None:
    fake.push(Behaviour.status_error(503))

    async def go() -> list[dict]:
        t = teacher(fake)
        try:
            return [c async for c in t.stream_chat_completion(BODY)]
        finally:
            await t.aclose()

    assert run(go())[-1]["usage"] and fake.served == 2


def test_pool_reuses_connections_under_concurrency(fake: FakeUpstream) -> None:
    async def go() -> int:
        t = teacher(fake, max_connections=4)
        try:
            results = await asyncio.gather(*[t.chat_completion(BODY) for _ in range(40)])
            return len(results)
        finally:
            await t.aclose()

    assert run(go()) == 40
    assert fake.served == 40 and fake.connections <= 4
