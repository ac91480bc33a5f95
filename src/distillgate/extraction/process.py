"""The extraction monitor in a child process (gateway config ``extraction.process: true``).

The monitor is the largest single cost on the gateway's event loop (docs/gateway.md#performance). In its own
process it runs beside the loop on another core; the loop only sends each request's features and awaits the signals
and the log record, which the decision needs before anything is forwarded.

Wire: a ``socketpair``; each frame is a 4-byte big-endian length and an orjson document. The first frame to the
child is its configuration (policy path, ``ExtractionSettings``); then each request is ``{"i": id, "op": ...}`` and
each answer ``{"i": id, ...}``. The child answers in order, batching what it has read. It exits when the socket
closes: when the gateway stops or dies (even by SIGKILL), the child follows.

A child that dies is started again on the next request (its windows start empty: the log says so); the requests it
had in hand fail with ``MonitorUnavailable`` (the gateway answers 503, nothing forwarded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import orjson

from distillgate.errors import DistillgateError
from distillgate.extraction.features import RequestFeatures
from distillgate.extraction.monitor import rules_from
from distillgate.extraction.seam import MonitorStatus, Observation
from distillgate.policy.extraction_rules import Signal
from distillgate.policy.model import PolicySet

_log = logging.getLogger("distillgate.extraction")
_LEN = struct.Struct(">I")
_FEATURES = tuple(f.name for f in fields(RequestFeatures))


class MonitorUnavailable(DistillgateError):
    """The extraction monitor's process is gone; the request it was judging is not decided."""

    exit_code = 3


def _frame(doc: Any) -> bytes:
    body = orjson.dumps(doc)
    return _LEN.pack(len(body)) + body


def _take_frames(buf: bytearray) -> list[Any]:
    """The documents of the whole frames at the start of ``buf``, removed from it (a partial frame stays)."""
    docs: list[Any] = []
    pos = 0
    while len(buf) - pos >= 4:
        (size,) = _LEN.unpack_from(buf, pos)
        if len(buf) - pos - 4 < size:
            break
        docs.append(orjson.loads(bytes(buf[pos + 4:pos + 4 + size])))
        pos += 4 + size
    del buf[:pos]
    return docs


class _Wire(asyncio.Protocol):
    """The gateway's end of the socket: frames in, futures resolved."""

    def __init__(self, owner: MonitorProcess) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for doc in _take_frames(self.buf):
            self.owner._answer(doc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self)


class MonitorProcess:
    """The ``Monitor`` seam (``distillgate.extraction.seam``) answered by a child process."""

    def __init__(self, policy_path: str, settings: dict[str, Any], policies: PolicySet, *,
                 start_timeout_s: float = 900.0, db: str | None = None) -> None:  # MiniLM on a loaded CPU: minutes
        self.policy_path = policy_path
        self.db = db  # the store the child shares its windows through (None: not shared)
        self.settings = settings
        self.policies = policies
        self.start_timeout_s = start_timeout_s
        self._embedder = settings.get("embedder", "none") != "none"
        self._rules_for = rules_from(policies)  # the lookup ExtractionMonitor uses
        self._proc: subprocess.Popen[bytes] | None = None
        self._wire: _Wire | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._starting: asyncio.Future[None] | None = None
        self.restarts = 0
        self.starts = 0  # children started
        self.backlog = 0  # the child's embedding queue, as of its last answer
        self.dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refused: str | None = None  # why no child may start (policy files changed): until a restart
        self._ready = False  # the child answered its ping with the gateway's policies

    # -- life ---------------------------------------------------------------------------------------------------
    async def _ensure(self) -> _Wire:
        if self._ready and self._wire is not None:
            return self._wire
        if self._refused is not None:
            raise MonitorUnavailable(self._refused)
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_future()
            try:
                await self._start()
                self._starting.set_result(None)
            except BaseException as exc:
                self._starting.set_exception(exc)
                self._starting.exception()  # retrieved: the waiters below re-raise it
                raise
            finally:
                self._starting = None
        else:
            await asyncio.shield(self._starting)
        assert self._wire is not None
        return self._wire

    async def _start(self) -> None:
        if self._proc is not None:  # a child that died: reap it
            self.restarts += 1
            _log.error("extraction monitor process exited (%s); starting a new one, its windows start empty",
                       self._proc.poll())
            self._stop_proc()
        ours, theirs = socket.socketpair()
        self.starts += 1
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "distillgate.extraction.process", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        _, wire = await loop.create_unix_connection(lambda: _Wire(self), sock=ours)
        self._loop = loop
        assert wire.transport is not None
        wire.transport.write(_frame({"policy": self.policy_path, "settings": self.settings, "db": self.db}))
        self._wire = wire
        try:
            hello = await asyncio.wait_for(self._call({"op": "ping"}), self.start_timeout_s)
            mine = sorted([p.policy_id, p.content_hash] for p in self.policies)
            if hello.get("policies") != mine:  # the files changed since the gateway loaded them
                self._refused = (f"the policy files at {self.policy_path} changed since the gateway started; the "
                                 "extraction monitor would judge by other rules than the decisions: restart the gateway")
                raise MonitorUnavailable(self._refused)
        except BaseException:
            await self.aclose()
            raise
        self._ready = True  # only now: a request arriving during the start waits for it (and its checks)

    def _stop_proc(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _hang_up(self) -> None:
        """Close the gateway's end of the socket: the child sees its end and exits."""
        wire, self._wire = self._wire, None
        self._ready = False
        if wire is not None and wire.transport is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed: its sockets went with it
                wire.transport.close()

    async def aclose(self) -> None:
        self._hang_up()
        await asyncio.to_thread(self._stop_proc)  # off the loop, which must turn for the socket to close

    def close(self) -> None:
        """Synchronous stop (outside a running loop: the server's final cleanup)."""
        self._hang_up()
        self._stop_proc()

    # -- calls ------------------------------------------------------------------------------------------------
    async def _call(self, doc: dict[str, Any]) -> dict[str, Any]:
        wire = self._wire
        if wire is None or wire.transport is None or wire.transport.is_closing():
            raise MonitorUnavailable("the extraction monitor process is not running")
        self._next += 1
        doc["i"] = self._next
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        wire.transport.write(_frame(doc))
        return await fut

    def _answer(self, doc: dict[str, Any]) -> None:
        self.backlog = doc.get("b", self.backlog)
        self.dropped = doc.get("d", self.dropped)
        fut = self._pending.pop(doc["i"], None)
        if fut is None or fut.done():
            return
        if "error" in doc:
            fut.set_exception(MonitorUnavailable(f"the extraction monitor failed: {doc['error']}"))
        else:
            fut.set_result(doc)

    def _lost(self, wire: _Wire) -> None:
        if self._wire is wire:
            self._wire = None
            self._ready = False
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(MonitorUnavailable("the extraction monitor process exited"))

    async def start(self) -> None:
        """Start the child (its embedder loaded, references embedded); returns when it answers."""
        await self._ensure()

    def status(self) -> MonitorStatus:
        return MonitorStatus(ready=self._ready, backlog=self.backlog, dropped=self.dropped)

    async def observe(self, features: RequestFeatures) -> Observation:
        """The signals that fired for ``features`` and the decision entry's ``extra`` (see ``log_extra``)."""
        if not self._ready:
            await self._ensure()
        doc = {name: getattr(features, name) for name in _FEATURES}  # dataclasses.asdict deep-copies: slow
        reply = await self._call({"op": "observe", "f": doc, "embed": self.records_embeddings(features.project)})
        return tuple(Signal.from_dict(s) for s in reply["s"]), reply["x"]

    def records_embeddings(self, project: str | None) -> bool:
        return self._embedder and self._rules_for(project).record_embeddings

    async def adrain(self) -> None:
        """Wait until the child's embedder has applied every queued prompt."""
        await self._ensure()
        await self._call({"op": "drain"})

    def drain(self, timeout: float | None = 60.0) -> None:
        """``adrain`` from another thread than the gateway's event loop (replays and tests)."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.adrain(), self._loop).result(timeout)


# -- the child --------------------------------------------------------------------------------------------------------
def _read_frames(sock: socket.socket, buf: bytearray) -> list[Any] | None:
    """Block until at least one whole frame is in; return them all (None at the end of the socket)."""
    frames: list[Any] = []
    while not frames:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        buf += chunk
        frames = _take_frames(buf)
    return frames


def _serve(sock: socket.socket) -> None:
    from distillgate.extraction.monitor import log_extra
    from distillgate.extraction.settings import ExtractionSettings, build_monitor
    from distillgate.policy import load_policies

    buf = bytearray()
    first = _read_frames(sock, buf)
    if not first:
        return
    config, queued = first[0], first[1:]
    policies = load_policies(config["policy"])
    settings = ExtractionSettings(**config["settings"])
    monitor = build_monitor(policies, settings, config.get("db"))
    if monitor.embedder is not None:
        monitor.embedder.embed(["warm up"])  # loaded before the first answer: the gateway is ready after ping
    try:
        while True:
            frames: Sequence[Any] | None = queued or _read_frames(sock, buf)
            queued = []
            if frames is None:
                return
            out = bytearray()
            for doc in frames:
                reply: dict[str, Any] = {"i": doc["i"]}
                try:
                    if doc["op"] == "observe":
                        f = doc["f"]
                        f["logit_bias"] = tuple((int(t), float(b)) for t, b in f["logit_bias"])
                        features = RequestFeatures(**f)
                        # back-pressure: the child waits for room in its embedder's queue (the gateway awaits it)
                        sketch, signals = monitor.observe_request(features, wait_s=settings.embed_wait_s)
                        embedding = monitor.embed_for_record(features) if doc.get("embed") else None
                        reply["s"] = [sig.as_dict() for sig in signals]
                        reply["x"] = log_extra(features, signals, embedding, sketch)
                    elif doc["op"] == "drain":
                        monitor.drain()
                    elif doc["op"] == "ping":
                        reply["policies"] = sorted([p.policy_id, p.content_hash] for p in policies)
                    else:
                        raise ValueError(f"unknown op {doc['op']!r}")
                except Exception as exc:  # answered, never fatal: the gateway turns it into a 503
                    _log.exception("extraction monitor failed on a request")
                    reply["error"] = f"{type(exc).__name__}: {exc}"
                reply["b"], reply["d"] = monitor.backlog, monitor.dropped
                out += _frame(reply)
            sock.sendall(out)
    finally:
        monitor.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    sock = socket.socket(fileno=int(args[0]))
    sock.setblocking(True)
    try:
        _serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the gateway went away
    finally:
        sock.close()
        os._exit(0)  # skip interpreter teardown: nothing is left to flush


if __name__ == "__main__":
    main()
