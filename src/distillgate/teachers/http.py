"""The OpenAI-compatible HTTP upstream: any endpoint that speaks ``/v1/chat/completions`` (OpenAI, vLLM, llama.cpp
server, the in-repo fake teacher).

One keep-alive connection pool per upstream (``distillgate.teachers.h1``); connect/read timeouts; retries with exponential backoff and full
jitter on 429 and 5xx answers and on connection failures (never after a streamed answer has started, never on a
read timeout: a stalled teacher is reported, not hammered). ``Retry-After`` is honoured up to ``max_backoff_s``.
The API key is read from the environment variable the config names, at construction, never from a file.

Besides the ``Teacher`` methods (dicts in, dicts out), the gateway's hot path uses the raw-bytes methods
``post_raw`` and ``stream_raw`` so that bodies are serialised once.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from distillgate.errors import ConfigError, ConfigIssue, UpstreamError
from distillgate.teachers.base import Teacher, TeacherCard
from distillgate.teachers.h1 import ConnectionFailed, ConnectTimeout, HttpPool, ReadTimeout, Response

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpUpstreamConfig:
    """How to reach one OpenAI-compatible endpoint."""

    name: str
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout_s: float = 120.0  # read timeout (time between bytes)
    connect_timeout_s: float = 5.0
    max_retries: int = 2
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    max_connections: int = 256

    def issues(self, path: str = "") -> list[ConfigIssue]:
        out: list[ConfigIssue] = []
        if not self.base_url.startswith(("http://", "https://")):
            out.append(ConfigIssue(f"{path}base_url", f"{self.base_url!r} is not an http(s) URL",
                                   "write it like http://host:port/v1"))
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            out.append(ConfigIssue(f"{path}api_key_env", f"environment variable {self.api_key_env} is not set",
                                   f"export {self.api_key_env}=... before starting, or drop api_key_env"))
        for key in ("timeout_s", "connect_timeout_s", "max_backoff_s"):
            if getattr(self, key) <= 0:
                out.append(ConfigIssue(f"{path}{key}", "must be > 0", "use a positive number of seconds"))
        if self.max_retries < 0 or self.backoff_s < 0:
            out.append(ConfigIssue(f"{path}max_retries", "max_retries and backoff_s must be >= 0", "use 0 or more"))
        if self.max_connections < 1:
            out.append(ConfigIssue(f"{path}max_connections", "must be >= 1", "use e.g. 256"))
        return out


def _retry_delay(cfg: HttpUpstreamConfig, attempt: int, retry_after: str | None) -> float:
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), cfg.max_backoff_s)
        except ValueError:
            pass
    return random.uniform(0, min(cfg.max_backoff_s, cfg.backoff_s * (2**attempt)))


def _error_message(status: int, body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
        msg = parsed.get("error", {}).get("message") if isinstance(parsed, dict) else None
    except (ValueError, AttributeError):
        msg = None
    return str(msg) if msg else body[:200].decode("utf-8", "replace")


class HttpTeacher(Teacher):
    """A teacher behind an OpenAI-compatible HTTP endpoint. ``model_name`` is the upstream's name.

    The client is ``distillgate.teachers.h1`` (one keep-alive pool per upstream and event loop): on the gateway's
    hot path it costs several times less CPU per request than aiohttp or httpx (see benchmarks/gateway.py).
    """

    def __init__(self, config: HttpUpstreamConfig) -> None:
        problems = config.issues(f"upstreams.{config.name}.")
        if problems:
            raise ConfigError(f"upstream {config.name!r}", problems)
        self.config = config
        self.model_name = config.name
        self._base = config.base_url.rstrip("/")
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if config.api_key_env:
            self._headers["authorization"] = f"Bearer {os.environ[config.api_key_env]}"
        self._pool: HttpPool | None = None

    def _client(self) -> HttpPool:
        loop = asyncio.get_running_loop()
        if self._pool is None or (self._pool.loop is not None and self._pool.loop is not loop):
            cfg = self.config  # a pool's connections belong to one event loop: another loop gets its own
            if self._pool is not None:
                self._pool.abandon()
            self._pool = HttpPool(self._base, self._headers, connect_timeout_s=cfg.connect_timeout_s,
                                  read_timeout_s=cfg.timeout_s, max_connections=cfg.max_connections)
        return self._pool

    def _timeout(self, exc: BaseException) -> UpstreamError:
        cfg = self.config
        return UpstreamError(f"upstream {cfg.name!r} did not answer within {cfg.timeout_s} s", status=504,
                             hint="raise timeout_s for this upstream or check the teacher")

    def _conn_failed(self, attempt: int, exc: BaseException) -> UpstreamError:
        cfg = self.config
        return UpstreamError(f"upstream {cfg.name!r} connection failed after {attempt + 1} attempt(s): "
                             f"{type(exc).__name__}: {exc}", status=502, hint=f"check that {cfg.base_url} is up")

    def _status_error(self, status: int, body: bytes) -> UpstreamError:
        return UpstreamError(f"upstream {self.config.name!r} answered {status}: {_error_message(status, body)}",
                             status=status)

    # -- raw bytes (gateway hot path) -------------------------------------------------------------------------
    async def post_raw(self, path: str, content: bytes) -> bytes:
        """POST ``content`` to ``path`` (e.g. ``/chat/completions``); return the 200 body bytes, retrying."""
        cfg = self.config
        attempt = 0
        while True:
            retry_after: str | None = None
            try:
                resp = await self._client().request("POST", path, content)
                body = await resp.read()
                if resp.status == 200:
                    return body
                if resp.status not in RETRY_STATUSES or attempt >= cfg.max_retries:
                    raise self._status_error(resp.status, body)
                retry_after = resp.header(b"retry-after")
            except ReadTimeout as exc:
                raise self._timeout(exc) from exc
            except (ConnectTimeout, ConnectionFailed) as exc:
                if attempt >= cfg.max_retries:
                    raise self._conn_failed(attempt, exc) from exc
            await asyncio.sleep(_retry_delay(cfg, attempt, retry_after))
            attempt += 1

    async def stream_raw(self, path: str, content: bytes) -> AsyncGenerator[bytes, None]:
        """POST a streaming request; yield each SSE ``data:`` payload (bytes, ``[DONE]`` excluded).

        Retries happen only before the answer starts. A stream that ends without ``[DONE]`` raises UpstreamError.
        """
        cfg = self.config
        attempt = 0
        while True:
            retry_after: str | None = None
            started = False
            try:
                async with self._client().stream("POST", path, content) as resp:
                    if resp.status == 200:
                        started = True
                        async for payload in _sse_payloads(resp):
                            yield payload
                        return
                    body = await resp.read()
                    if resp.status not in RETRY_STATUSES or attempt >= cfg.max_retries:
                        raise self._status_error(resp.status, body)
                    retry_after = resp.header(b"retry-after")
            except _StreamBroken as exc:
                raise UpstreamError(f"upstream {cfg.name!r} stream broke midway: {exc}", status=502) from exc
            except ReadTimeout as exc:
                raise self._timeout(exc) from exc
            except (ConnectTimeout, ConnectionFailed) as exc:
                if started:
                    raise UpstreamError(f"upstream {cfg.name!r} stream broke midway: {exc}", status=502) from exc
                if attempt >= cfg.max_retries:
                    raise self._conn_failed(attempt, exc) from exc
            await asyncio.sleep(_retry_delay(cfg, attempt, retry_after))
            attempt += 1

    async def get_models(self) -> list[str]:
        try:
            resp = await self._client().request("GET", "/models")
        except (ConnectTimeout, ConnectionFailed, ReadTimeout) as exc:
            raise self._conn_failed(0, exc) from exc
        if resp.status != 200:
            raise UpstreamError(f"upstream {self.config.name!r} /models answered {resp.status}", status=resp.status)
        return [str(m["id"]) for m in orjson.loads(await resp.read()).get("data", [])]

    # -- Teacher interface ------------------------------------------------------------------------------------
    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = orjson.loads(await self.post_raw("/chat/completions", orjson.dumps(dict(body))))
        return out

    async def stream_chat_completion(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        req = dict(body)
        req["stream"] = True
        req["stream_options"] = {**(req.get("stream_options") or {}), "include_usage": True}
        async for payload in self.stream_raw("/chat/completions", orjson.dumps(req)):
            chunk: dict[str, Any] = orjson.loads(payload)
            yield chunk

    async def completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = orjson.loads(await self.post_raw("/completions", orjson.dumps(dict(body))))
        return out

    def card(self) -> TeacherCard:
        return TeacherCard(model_id=self.config.name, backend="http", source=self.config.base_url)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None


class _StreamBroken(Exception):
    pass


async def _sse_payloads(resp: Response) -> AsyncIterator[bytes]:
    """Split an SSE body into ``data:`` payloads; raise _StreamBroken if it ends before ``[DONE]``."""
    pending = b""
    try:
        async for chunk in resp.iter_chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw_line in lines:
                line = raw_line.strip()
                if line.startswith(b"data:"):
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    if data:
                        yield data
    except ConnectionFailed as exc:
        raise _StreamBroken(f"{type(exc).__name__}: {exc}") from exc
    raise _StreamBroken("connection closed before [DONE]")
