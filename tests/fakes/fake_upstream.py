"""A real OpenAI-compatible teacher HTTP server for tests and benchmarks (no mocks: it speaks HTTP/1.1 on a socket).

It answers ``POST /v1/chat/completions`` (non-streaming and SSE streaming, ``n``, ``logprobs``/``top_logprobs``,
``stream_options.include_usage``), ``POST /v1/completions`` and ``GET /v1/models``, always with ``usage``. The reply
is deterministic: ``Echo: <last user message>`` cut to ``max_tokens`` words, or a fixed ``reply`` you set.

It can be told to misbehave, one behaviour per upcoming request (FIFO), from Python or over HTTP:

    status  answer with an HTTP error (e.g. 503, 429 with ``Retry-After``) and an OpenAI-shaped error body
    stall   wait ``seconds`` before answering (longer than the client's timeout → the client times out)
    reset   drop the connection with a TCP reset before answering
    cut     stream ``after_chunks`` SSE chunks, then close the connection without ``[DONE]``
    slow    stream normally but wait ``seconds`` between SSE chunks (for client-disconnect tests)
    inflate answer normally but report ``extra_tokens`` more completion tokens than it produced (a lying upstream)
    answer  answer 200 with ``body`` (a JSON text) instead of a completion (a broken upstream)

Usage: by default ``prompt_tokens`` counts the prompt's words. ``FakeUpstream(tokenizer="bytes")`` counts like a
worst-case byte-fallback tokenizer instead: one token per ASCII letter/digit run, one per byte of every other
non-space character, over the messages *and* the tool schemas and response format (what a teacher's chat template
renders), so prompts of single letters, CJK, emoji or long tool schemas cost what they would cost at worst.
With ``tool_choice: "required"`` and ``tools`` the answer is a call of the first tool (streamed in two pieces).

Python::

    with fake_upstream() as fake:           # starts on a free loopback port in a background thread
        fake.push(Behaviour.status(503), Behaviour.reset())
        client = OpenAI(base_url=fake.base_url, api_key="x")

Command line (another process)::

    python tests/fakes/fake_upstream.py --port 8931
    curl -X POST localhost:8931/_fake/behaviours -d '[{"kind": "status", "status": 429}]'

Control routes: ``POST /_fake/behaviours`` (JSON list of behaviours), ``POST /_fake/reply`` (``{"reply": str|null}``),
``GET /_fake/requests`` (bodies received, newest last), ``POST /_fake/clear``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

MODELS = ("fake-teacher", "fake-teacher-large")


@dataclass(frozen=True)
class Behaviour:
    """What the fake does with one request."""

    kind: str = "ok"  # ok | status | stall | reset | cut | slow | inflate | answer
    status: int = 200
    seconds: float = 0.0
    after_chunks: int = 2
    retry_after: float | None = None
    extra_tokens: int = 0
    body: str | None = None

    @classmethod
    def status_error(cls, status: int, retry_after: float | None = None) -> Behaviour:
        return cls(kind="status", status=status, retry_after=retry_after)

    @classmethod
    def stall(cls, seconds: float) -> Behaviour:
        return cls(kind="stall", seconds=seconds)

    @classmethod
    def reset(cls) -> Behaviour:
        return cls(kind="reset")

    @classmethod
    def cut(cls, after_chunks: int = 2) -> Behaviour:
        return cls(kind="cut", after_chunks=after_chunks)

    @classmethod
    def slow(cls, seconds: float) -> Behaviour:
        return cls(kind="slow", seconds=seconds)

    @classmethod
    def inflate(cls, extra_tokens: int) -> Behaviour:
        return cls(kind="inflate", extra_tokens=extra_tokens)

    @classmethod
    def answer(cls, body: Any) -> Behaviour:
        return cls(kind="answer", body=orjson.dumps(body).decode())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Behaviour:
        allowed = {"kind", "status", "seconds", "after_chunks", "retry_after", "extra_tokens", "body"}
        kinds = {"ok", "status", "stall", "reset", "cut", "slow", "inflate", "answer"}
        unknown = set(raw) - allowed
        if unknown or raw.get("kind") not in kinds:
            raise ValueError(f"bad behaviour {raw!r}: kind in {'|'.join(sorted(kinds))}, keys {sorted(allowed)}")
        return cls(**raw)


@dataclass
class _State:
    behaviours: deque[Behaviour] = field(default_factory=deque)
    reply: str | None = None
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=2000))
    served: int = 0
    connections: int = 0


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_response(status: int, payload: Any, extra: list[tuple[str, str]] | None = None) -> bytes:
    body = orjson.dumps(payload)
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), *(extra or [])]
    return _head(status, headers) + body


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _words(text: str) -> list[str]:
    return text.split()


def _worst_case_tokens(text: str) -> int:
    """One token per ASCII letter/digit run, one per UTF-8 byte of every other non-space character."""
    return sum(1 if m.group().isascii() and m.group().isalnum() else len(m.group().encode())
               for m in re.finditer(r"[A-Za-z0-9]+|\S", text))


def _tool_call(req: dict[str, Any]) -> dict[str, Any] | None:
    tools = req.get("tools")
    if req.get("tool_choice") != "required" or not isinstance(tools, list) or not tools:
        return None
    name = str(((tools[0] or {}).get("function") or {}).get("name", "tool"))
    return {"id": "call_fake_1", "type": "function", "function": {"name": name, "arguments": '{"query": "fake"}'}}


def _logprob_entry(token: str, i: int, top: int) -> dict[str, Any]:
    lp = -0.05 * ((i % 7) + 1)
    alts = [{"token": token if j == 0 else f"{token}~{j}", "logprob": lp - j * 0.731,
             "bytes": list((token if j == 0 else f"{token}~{j}").encode())} for j in range(top)]
    return {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": alts}


class FakeUpstream:
    """The server. Use :func:`fake_upstream` (context manager) or :meth:`start` / :meth:`stop`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, reply: str | None = None,
                 tokenizer: str = "words") -> None:
        self.host = host
        self.port = port
        self.tokenizer = tokenizer
        self._state = _State(reply=reply)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- control from Python ---------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def push(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self._state.behaviours.extend(behaviours)

    def set_reply(self, reply: str | None) -> None:
        with self._lock:
            self._state.reply = reply

    def clear(self) -> None:
        with self._lock:
            self._state.behaviours.clear()
            self._state.requests.clear()
            self._state.reply = None
            self._state.served = 0
            self._state.connections = 0

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._state.requests)

    @property
    def served(self) -> int:
        """Inference requests received since the last clear()."""
        return self._state.served

    @property
    def connections(self) -> int:
        """TCP connections accepted since the last clear()."""
        return self._state.connections

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> FakeUpstream:
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake upstream did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(10)

    def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        assert self._loop is not None
        self._loop.call_later(0.05, self._loop.stop)

    def _run(self) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is installed with uvicorn[standard]
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(
            asyncio.start_server(self._handle, self.host, self.port, backlog=1024))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def serve_forever(self) -> None:
        """Run in the current event loop (used by ``python fake_upstream.py``)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        async with self._server:
            await self._server.serve_forever()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self._state.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, _version = lines[0].split(" ", 2)
                except ValueError:
                    writer.write(_json_response(400, {"error": {"message": "bad request line"}}))
                    return
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                keep = await self._dispatch(method, target.split("?", 1)[0], headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    def _next_behaviour(self) -> Behaviour:
        with self._lock:
            return self._state.behaviours.popleft() if self._state.behaviours else Behaviour()

    async def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes,
                        writer: asyncio.StreamWriter) -> bool:
        if path.startswith("/_fake/"):
            writer.write(self._control(method, path, body))
            return True
        if method == "GET" and path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in MODELS]
            writer.write(_json_response(200, {"object": "list", "data": data}))
            return True
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            writer.write(_json_response(404, {"error": {"message": f"no route {method} {path}",
                                                         "type": "invalid_request_error", "code": None}}))
            return True
        try:
            req = orjson.loads(body)
            if not isinstance(req, dict):
                raise ValueError("body is not an object")
        except ValueError as exc:
            writer.write(_json_response(400, {"error": {"message": f"bad JSON: {exc}",
                                                         "type": "invalid_request_error", "code": None}}))
            return True
        with self._lock:
            self._state.requests.append({"path": path, "headers": headers, "body": req})
            self._state.served += 1
        beh = self._next_behaviour()
        if beh.kind == "stall":
            await asyncio.sleep(beh.seconds)
        elif beh.kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif beh.kind == "status":
            extra = [("retry-after", str(beh.retry_after))] if beh.retry_after is not None else []
            err = {"error": {"message": f"fake upstream told to fail with {beh.status}",
                             "type": "server_error" if beh.status >= 500 else "rate_limit_error", "code": None}}
            writer.write(_json_response(beh.status, err, extra))
            return True
        elif beh.kind == "answer":
            raw = (beh.body or "").encode()
            writer.write(_head(200, [("content-type", "application/json"), ("content-length", str(len(raw)))]) + raw)
            return True
        chat = path == "/v1/chat/completions"
        if req.get("stream"):
            await self._stream(req, chat, writer, beh)
            return beh.kind != "cut"
        answer = self._complete(req, chat)
        if beh.kind == "inflate":
            answer["usage"]["completion_tokens"] += beh.extra_tokens
            answer["usage"]["total_tokens"] += beh.extra_tokens
        writer.write(_json_response(200, answer))
        return True

    def _control(self, method: str, path: str, body: bytes) -> bytes:
        try:
            if method == "POST" and path == "/_fake/behaviours":
                self.push(*(Behaviour.from_dict(b) for b in orjson.loads(body)))
            elif method == "POST" and path == "/_fake/reply":
                self.set_reply(orjson.loads(body).get("reply"))
            elif method == "POST" and path == "/_fake/clear":
                self.clear()
            elif method == "GET" and path == "/_fake/requests":
                return _json_response(200, self.requests)
            else:
                return _json_response(404, {"error": {"message": f"no control route {method} {path}"}})
        except (ValueError, TypeError, AttributeError) as exc:
            return _json_response(400, {"error": {"message": str(exc)}})
        return _json_response(200, {"ok": True})

    # -- answers -------------------------------------------------------------------------------------------------
    def _reply_words(self, req: dict[str, Any], chat: bool) -> tuple[list[str], int]:
        if chat:
            msgs = req.get("messages") or []
            prompt_text = " ".join(_text_of(m.get("content")) for m in msgs if isinstance(m, dict))
            last = next((_text_of(m.get("content")) for m in reversed(msgs)
                         if isinstance(m, dict) and m.get("role") == "user"), "")
        else:
            prompt = req.get("prompt", "")
            prompt_text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
            last = prompt_text
        reply = self._state.reply
        words = _words(reply) if reply is not None else ["Echo:", *_words(last)]
        limit = req.get("max_completion_tokens") or req.get("max_tokens")
        if isinstance(limit, int) and limit > 0:
            words = words[:limit]
        if self.tokenizer == "bytes":
            rendered = prompt_text + "".join(orjson.dumps(req[k]).decode() for k in ("tools", "response_format")
                                             if req.get(k) is not None)
            return words, max(1, _worst_case_tokens(rendered))
        return words, max(1, len(_words(prompt_text)))

    def _complete(self, req: dict[str, Any], chat: bool) -> dict[str, Any]:
        words, prompt_tokens = self._reply_words(req, chat)
        reply = self._state.reply
        text = reply if reply is not None and len(words) == len(_words(reply)) else " ".join(words)
        n = req.get("n") or 1
        top = req.get("top_logprobs") or 0
        want_lp = bool(req.get("logprobs")) if chat else req.get("logprobs") is not None
        choices = []
        for i in range(n):
            if chat:
                choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop", "logprobs": None}
                if want_lp:
                    choice["logprobs"] = {"content": [_logprob_entry(w, k, top) for k, w in enumerate(words)]}
                labels = req.get("label_choices")
                if isinstance(labels, list) and labels:  # distillgate's label_choices extension
                    # deterministic: the label sharing most characters with the prompt wins, probabilities decay
                    prompt = " ".join(str(m.get("content", "")) for m in req.get("messages", []))
                    ranked = sorted(labels, key=lambda lab: (-sum(c in prompt for c in str(lab)), str(lab)))
                    weights = [1.0 / (r + 1) for r in range(len(ranked))]
                    total = sum(weights)
                    choice["message"]["content"] = ranked[0]
                    choice["label_probs"] = {lab: w / total for lab, w in zip(ranked, weights, strict=True)}
                call = _tool_call(req)
                if call is not None:
                    choice["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
                    choice["finish_reason"] = "tool_calls"
            else:
                choice = {"index": i, "text": text, "finish_reason": "stop", "logprobs": None}
                if want_lp:
                    k_top = int(req.get("logprobs") or 0)
                    entries = [_logprob_entry(w, k, k_top) for k, w in enumerate(words)]
                    choice["logprobs"] = {
                        "tokens": words, "token_logprobs": [e["logprob"] for e in entries],
                        "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
                        "text_offset": [sum(len(w) + 1 for w in words[:k]) for k in range(len(words))]}
            choices.append(choice)
        completion_tokens = len(words) * n
        return {"id": f"fake-{time.monotonic_ns()}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": req.get("model", "fake-teacher"),
                "system_fingerprint": "fp_fake", "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def _stream(self, req: dict[str, Any], chat: bool, writer: asyncio.StreamWriter, beh: Behaviour) -> None:
        words, prompt_tokens = self._reply_words(req, chat)
        n = req.get("n") or 1
        top = req.get("top_logprobs") or 0
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        rid = f"fake-{time.monotonic_ns()}"
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": req.get("model", "fake-teacher")}
        events: list[dict[str, Any]] = []
        for i in range(n):
            if chat:
                events.append({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None, "logprobs": None}]})
        call = _tool_call(req) if chat else None
        if call is not None:  # the call in two deltas: id and name, then the arguments in two halves
            args = call["function"]["arguments"]
            half = len(args) // 2
            for i in range(n):
                events.append({**base, "choices": [{"index": i, "delta": {"tool_calls": [
                    {"index": 0, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": args[:half]}}]},
                    "finish_reason": None}]})
                events.append({**base, "choices": [{"index": i, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": args[half:]}}]}, "finish_reason": None}]})
            words = []
        for k, w in enumerate(words):
            piece = w if k == 0 else " " + w
            for i in range(n):
                if chat:
                    lp = {"content": [_logprob_entry(piece, k, top)]} if req.get("logprobs") else None
                    events.append({**base, "choices": [{"index": i, "delta": {"content": piece},
                                                        "finish_reason": None, "logprobs": lp}]})
                else:
                    events.append({**base, "choices": [{"index": i, "text": piece, "finish_reason": None}]})
        for i in range(n):
            last: dict[str, Any] = {"index": i, "finish_reason": "tool_calls" if call is not None else "stop"}
            last.update({"delta": {}} if chat else {"text": ""})
            events.append({**base, "choices": [last]})
        if include_usage:
            ct = len(words) * n
            events.append({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ct,
                                                            "total_tokens": prompt_tokens + ct}})
        writer.write(_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked"),
                                 ("cache-control", "no-cache")]))
        for count, ev in enumerate(events):
            if beh.kind == "cut" and count >= beh.after_chunks:
                await writer.drain()
                writer.transport.abort()
                return
            data = b"data: " + orjson.dumps(ev) + b"\n\n"
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            if beh.kind == "slow":
                await writer.drain()
                await asyncio.sleep(beh.seconds)
            elif count % 8 == 7:
                await writer.drain()
        done = b"data: [DONE]\n\n"
        writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        await writer.drain()


@contextlib.contextmanager
def fake_upstream(*, reply: str | None = None, host: str = "127.0.0.1", port: int = 0,
                  tokenizer: str = "words") -> Iterator[FakeUpstream]:
    """Start a fake teacher on a free loopback port (background thread); stop it on exit."""
    server = FakeUpstream(host, port, reply=reply, tokenizer=tokenizer).start()
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible teacher for tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--reply", default=None, help="fixed reply text (default: echo the last user message)")
    args = parser.parse_args(argv)
    server = FakeUpstream(args.host, args.port, reply=args.reply)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    print(f"fake upstream on http://{args.host}:{args.port}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        runner(server.serve_forever())


if __name__ == "__main__":
    main()
