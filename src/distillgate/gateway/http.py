"""ASGI plumbing the gateway's layers share: the response channel that knows whether headers went out, and the
reading of request headers and bodies with their bounds.

``Responder`` wraps ``send`` (as starlette's error middleware does): it records whether the response started and
whether it finished, so the error layer answers an error as JSON when nothing went out, as a last SSE event when a
stream is under way, and not at all when the response is complete, without guessing. A ``gate`` (the decision's
durable commit) is awaited before the first byte of any response, so no answer, error answers included, reaches a
client before its decision is in the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from itertools import chain
from typing import Any

from distillgate.gateway.errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Header = tuple[bytes, bytes]

JSON = (b"content-type", b"application/json")
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
#: headers that carry identity: a second copy could override what a proxy injected, so duplicates are refused
SINGLE_HEADERS = frozenset({b"authorization", b"x-api-key", b"x-policy-user", b"x-policy-project", b"x-policy-run",
                            b"x-policy-output-type", b"x-policy-run-size", b"content-length"})


class Responder:
    """``send`` with memory: ``started``/``finished``, the status sent, and headers added to every response."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False
        self.status = 500
        self.headers: list[Header] = []  # e.g. x-distillgate-decision, once the decision is known
        self.gate: Awaitable[Any] | None = None

    async def _open(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            try:
                await gate
            except Exception as exc:  # the decision's commit failed: nothing may be told but that
                raise ApiError(503, f"the decision could not be written to the decision log ({exc}); nothing was "
                               "answered: retry later", code="decision_log_unavailable") from exc

    async def start(self, status: int, headers: Sequence[Header]) -> None:
        if self.gate is not None:
            await self._open()
        self.started = True
        self.status = status
        await self._send({"type": "http.response.start", "status": status, "headers": [*headers, *self.headers]})

    async def body(self, data: bytes, *, more: bool = False) -> None:
        self.finished = not more
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def whole(self, status: int, data: bytes, headers: Sequence[Header] = (JSON,)) -> None:
        """``start`` then ``body`` (written out here: two coroutines less for every answer)."""
        if self.gate is not None:
            await self._open()
        self.started = True
        self.status = status
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [*headers, (b"content-length", b"%d" % len(data)), *self.headers]})
        self.finished = True
        await self._send({"type": "http.response.body", "body": data, "more_body": False})


def header_map(scope: Scope, max_bytes: int) -> dict[str, str]:
    """The request headers (lower-case names); 431 past ``max_bytes`` in all, 400 for a duplicated identity header.

    One pass builds the map; only a request with a repeated name (fewer names than headers) is looked at again, to
    tell a repeated identity header (refused) from any other repeated header (the last copy wins)."""
    raw = scope["headers"]
    size = 4 * len(raw) + sum(map(len, chain.from_iterable(raw)))  # no Python loop: this runs for every request
    if size > max_bytes:
        raise ApiError(431, f"the request headers are larger than {max_bytes} bytes; send fewer or shorter headers",
                       code="request_header_fields_too_large")
    out = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
    if len(out) < len(raw):
        seen: set[bytes] = set()
        for k, _ in raw:
            if k in SINGLE_HEADERS and k in seen:
                name = k.decode("latin-1")
                raise ApiError(400, f"the header {name!r} appears more than once; send it once (a duplicated "
                               "identity header could override what a proxy set)", code="duplicate_header",
                               param=name)
            seen.add(k)
    return out


class BodyReader:
    """Reads request bodies: at most ``max_bytes``, within ``timeout_s``, and at most ``max_readers`` at once (a
    client that opens connections and sends bodies slowly holds a slot each; past the bound new ones get 503)."""

    def __init__(self, max_bytes: int, timeout_s: float, max_readers: int) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_readers = max_readers
        self.reading = 0

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.max_bytes} bytes; send less",
                        code="request_too_large")

    async def read(self, headers: dict[str, str], receive: Receive) -> bytes:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large()
        if self.reading >= self.max_readers:
            raise ApiError(503, f"{self.reading} requests are still sending their bodies; retry later",
                           code="too_many_uploads", headers=[(b"retry-after", b"1")])
        # The deadline is asyncio.timeout's, written out: one timer that cancels this task, and a cancellation
        # that is the timer's own (none from outside came with it) answered 408. asyncio.timeout's context
        # manager costs three times the timer itself, on every request.
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            task.cancel()

        self.reading += 1
        timer = asyncio.get_running_loop().call_later(self.timeout_s, expire)
        try:  # the messages until the last (inline: one coroutine less per request)
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ApiError(400, "the client disconnected while sending the body", code="client_disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_large()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                raise ApiError(408, f"the request body did not arrive within {self.timeout_s:g} s; send the whole "
                               "body at once", code="request_timeout", headers=[(b"connection", b"close")]) from None
            raise
        finally:
            timer.cancel()
            self.reading -= 1


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
