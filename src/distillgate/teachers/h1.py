"""A small keep-alive HTTP/1.1 client for one origin: the gateway's upstream calls.

Why not aiohttp: on the gateway's hot path aiohttp cost about 100 us of CPU per request on the benchmark machine,
this client about 20-30 us (``benchmarks/gateway.py``; the gateway is bound by one core's Python time). It does only
what an OpenAI-compatible upstream needs:

- ``POST``/``GET`` with a body and fixed headers over a pool of keep-alive connections (``http`` or ``https``),
  at most ``max_connections`` open; callers wait for a free one beyond that;
- responses framed by ``Content-Length``, ``chunked`` encoding or the end of the connection (parsed by ``httptools``,
  the parser uvicorn uses);
- a connect timeout and a read timeout (time between bytes, not a total): one timer per connection, armed by a
  request when none is pending and left running after the answer (when it fires it looks at the request in
  flight, if any, and sets itself again for what is left), so a keep-alive request starts and stops no timer;
- streaming bodies with back-pressure (reading pauses while the consumer is behind);
- a request on a reused connection that the server had closed (no byte of an answer came back) is sent again once on
  a fresh connection; any other failure is the caller's to retry.

A cancelled call aborts its connection (its state is unknown); it is never put back into the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

_PAUSE_AT = 256 * 1024  # buffered streaming bytes before reading pauses


class ConnectTimeout(Exception):
    """No connection within the connect timeout."""


class ReadTimeout(Exception):
    """The server sent nothing for longer than the read timeout."""


class ConnectionFailed(Exception):
    """The connection could not be made, or broke before the answer ended."""


class _Stale(ConnectionFailed):
    """A reused keep-alive connection was closed by the server before any byte of the answer."""


class Response:
    """One answer: ``status``, ``headers`` (lower-cased names, bytes), and the body (whole, or streamed)."""

    __slots__ = (
        "_body",
        "_buffered",
        "_chunks",
        "_conn",
        "_framed",
        "_waiter",
        "complete",
        "error",
        "got_bytes",
        "head_done",
        "headers",
        "keep_alive",
        "last_activity",
        "status",
    )

    def __init__(self, conn: _Conn) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self.complete = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.keep_alive = False
        self.got_bytes = False
        self.head_done = False
        self._framed = True  # Content-Length or chunked; False: the body ends with the connection
        self.last_activity = time.monotonic()
        self._conn = conn
        self._body: bytes | None = None

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), decoded, or None."""
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return None

    # -- signalling from the protocol ----------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = exc
            self._wake()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _wait_head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body (read once, then kept)."""
        if self._body is None:
            while not self.complete:
                if self.error is not None:
                    raise self.error
                await self._wait()
            self._body = b"".join(self._chunks)
            self._chunks.clear()
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < _PAUSE_AT // 2:
                    self._conn.resume()
                yield chunk
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            self.last_activity = time.monotonic()  # a slow consumer is not a silent server
            await self._wait()

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _PAUSE_AT:
            self._conn.pause()
        self._wake()


class _Conn(asyncio.Protocol):
    """One connection; at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self.paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._reused = False  # the request in flight went out on a connection that had served one before

    # -- asyncio.Protocol ------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        r = self.resp
        if r is None:  # nothing asked: a server talking out of turn is not trusted with the next request
            self.abort()
            return
        r.got_bytes = True
        r.last_activity = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            r._fail(ConnectionFailed(f"malformed HTTP answer: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        r = self.resp
        if r is None or r.complete:
            return
        if r.head_done and not r._framed and exc is None:  # the body was delimited by the end of the connection
            r.complete = True
            r.keep_alive = False
            r._wake()
            return
        reason = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
        if not r.got_bytes and self._reused:
            r._fail(_Stale(reason))
        else:
            r._fail(ConnectionFailed(f"{reason} before the answer ended"))

    # -- httptools callbacks ---------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.resp is not None
        self.resp.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        r = self.resp
        assert r is not None
        r.status = self.parser.get_status_code()
        r.keep_alive = self.parser.should_keep_alive()
        r._framed = any(k in (b"content-length", b"transfer-encoding") for k, _ in r.headers) or r.status in (
            204, 304) or 100 <= r.status < 200
        r.head_done = True
        r._wake()

    def on_body(self, body: bytes) -> None:
        assert self.resp is not None
        self.resp._feed(body)

    def on_message_complete(self) -> None:
        r = self.resp
        assert r is not None
        r.complete = True  # the timer stays: it finds no request in flight and lapses, or serves the next one
        r._wake()

    # -- use --------------------------------------------------------------------------------------------------
    def send(self, data: bytes, read_timeout: float, reused: bool) -> Response:
        assert self.transport is not None
        self._reused = reused  # the parser carries on: llhttp resets itself after each complete answer
        r = self.resp = Response(self)
        if self._timer is None or read_timeout < self._read_timeout:  # a shorter timeout cannot wait for the old
            self._cancel_timer()
            self._timer = asyncio.get_running_loop().call_later(read_timeout, self._check_timeout)
        self._read_timeout = read_timeout
        self.transport.write(data)
        return r

    def _check_timeout(self) -> None:
        self._timer = None
        r = self.resp
        if r is None or r.complete or r.error is not None:
            return
        loop = asyncio.get_running_loop()
        idle = time.monotonic() - r.last_activity
        if self.paused:  # the consumer is behind, not the server: look again later
            self._timer = loop.call_later(self._read_timeout, self._check_timeout)
        elif idle >= self._read_timeout:
            r._fail(ReadTimeout(f"no data for {self._read_timeout:g} s"))
            self.abort()
        else:
            self._timer = loop.call_later(self._read_timeout - idle, self._check_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()


class HttpPool:
    """Keep-alive connections to the origin of ``base_url``; requests go to ``base_url``'s path + their path.

    Bound to the event loop it is first used in; ``HttpTeacher`` makes a new pool for another loop.
    """

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None, *, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 120.0, max_connections: int = 256, idle_timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        self.host = parts.hostname
        default = 443 if parts.scheme == "https" else 80
        self.port = parts.port or default
        self.prefix = parts.path.rstrip("/")
        default_port = self.port == default
        host_header = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not default_port:  # IPv6 literal
            host_header = f"[{self.host}]:{self.port}"
        fixed = {"host": host_header, "user-agent": "distillgate", **{k.lower(): v for k, v in (headers or {}).items()}}
        for k, v in fixed.items():
            if any(c in k + v for c in "\r\n"):
                raise ValueError(f"header {k!r} contains a line break")
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._idle: list[_Conn] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connections_made = 0

    def _head(self, method: str, path: str, length: int | None) -> bytes:
        size = b"" if length is None else b"content-length: %d\r\n" % length
        return f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._fixed + size + b"\r\n"

    # -- connections ---------------------------------------------------------------------------------------------
    async def _acquire(self) -> tuple[_Conn, bool]:
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
        now = time.monotonic()
        while True:
            while self._idle:
                conn = self._idle.pop()
                if (not conn.closed and now - conn.idle_since < self.idle_timeout_s
                        and conn.transport is not None and not conn.transport.is_closing()):
                    return conn, True
                conn.abort()
                self._open -= 1
            if self._open < self.max_connections:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn on
                raise
        self._open += 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Conn, self.host, self.port, ssl=self._ssl,
                                       server_hostname=self.host if self._ssl else None),
                self.connect_timeout_s)
        except BaseException as exc:
            self._open -= 1
            self._wake_one()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"no connection to {self.host}:{self.port} within {self.connect_timeout_s:g} s"
                                     ) from exc
            if isinstance(exc, OSError):
                raise ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
            raise
        self.connections_made += 1
        return conn, False

    def _release(self, conn: _Conn, reusable: bool) -> None:
        conn.resp = None
        if reusable and not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.abort()
            self._open -= 1
        self._wake_one()

    def _drop_idle(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._open -= len(self._idle)
        self._idle.clear()
        self._wake_one()

    def abandon(self) -> None:
        """Drop the idle connections of a pool whose event loop may be gone (no awaiting)."""
        for conn in self._idle:
            with contextlib.suppress(RuntimeError):  # the loop is closed: its transports went with it
                conn.abort()
        self._idle.clear()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def _send(self, method: str, path: str, body: bytes | None) -> tuple[_Conn, Response]:
        """A connection with the request sent and the answer's head received."""
        data = self._head(method, path, None if body is None else len(body)) + (body or b"")
        for attempt in (0, 1):
            conn, reused = await self._acquire()
            resp = conn.send(data, self.read_timeout_s, reused)
            try:
                await resp._wait_head()
            except _Stale:
                self._release(conn, False)
                self._drop_idle()  # connections idle as long as this one are likely closed too
                if attempt == 0:
                    continue  # the server had closed the idle connection: once more on a fresh one
                raise
            except BaseException:
                self._release(conn, False)
                raise
            return conn, resp
        raise AssertionError("unreachable")

    # -- requests --------------------------------------------------------------------------------------------------
    async def request(self, method: str, path: str, body: bytes | None = None) -> Response:
        """Send a request; return its answer with the whole body read (``Response.read()`` is then immediate)."""
        conn, resp = await self._send(method, path, body)
        try:
            await resp.read()
        except BaseException:
            self._release(conn, False)
            raise
        self._release(conn, resp.keep_alive)
        return resp

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, body: bytes | None = None) -> AsyncIterator[Response]:
        """Send a request; yield its answer once the head arrived (iterate ``iter_chunks()`` for the body)."""
        conn, resp = await self._send(method, path, body)
        try:
            yield resp
        finally:
            self._release(conn, resp.complete and resp.keep_alive and resp.error is None)

    async def aclose(self) -> None:
        self._drop_idle()
