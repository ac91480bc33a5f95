"""A real OpenAI-compatible chat server on loopback for the evaluation tests (a fake teacher, not a mock).

``FakeChatServer(answer)`` starts a Starlette app under uvicorn in a thread. ``answer(model, messages)`` returns
the reply text, or ``(text, logprob)`` to set the per-token log-probability reported when ``logprobs`` is asked. Requests (body and headers) are kept in ``server.requests`` so tests can check that identity
headers travelled. A user message containing ``DENY`` is refused with an OpenAI-shaped 403 body, like the policy
gateway does.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

Answerer = Callable[[str, list[dict[str, str]]], "str | tuple[str, float]"]


class FakeChatServer:
    def __init__(self, answer: Answerer, *, models: tuple[str, ...] = ("fake-teacher",),
                 parameter_count: int = 1_000_000, logprob: float = -0.2) -> None:
        self.answer = answer
        self.models = models
        self.parameter_count = parameter_count
        self.logprob = logprob
        self.requests: list[dict[str, Any]] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append({"body": body, "headers": dict(request.headers)})
        if request.headers.get("authorization") != "Bearer test-key":
            return JSONResponse({"error": {"message": "bad key", "type": "auth", "code": "UNAUTHORIZED"}},
                                status_code=401)
        user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        if "DENY" in user:
            return JSONResponse({"error": {"message": "denied by policy", "type": "policy_denied",
                                           "code": "OUTPUT_TYPE_BLOCKED", "reasons": ["OUTPUT_TYPE_BLOCKED"]}},
                                status_code=403, headers={"X-Policy-Decision": "deny"})
        reply = self.answer(body["model"], body["messages"])
        text, logprob = reply if isinstance(reply, tuple) else (reply, self.logprob)
        tokens = max(1, len(text.split()))
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": w, "logprob": logprob} for w in text.split()]}
        return JSONResponse({
            "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "choices": [choice],
            "usage": {"prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                      "completion_tokens": tokens,
                      "total_tokens": tokens + sum(len(m["content"].split()) for m in body["messages"])},
        }, headers={"X-Policy-Decision": "allow", "X-Policy-Id": "test-policy"})

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "test", "parameter_count": self.parameter_count}
            for m in self.models]})

    def __enter__(self) -> FakeChatServer:
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                Route("/v1/models", self._models, methods=["GET"])])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake chat server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


def lookup_answerer(table: dict[str, str], default: str = "no idea") -> Answerer:
    """Answer a classification prompt from a text -> label table (what a perfect or seeded-wrong teacher says)."""

    def answer(model: str, messages: list[dict[str, str]]) -> str:
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        return table.get(user, default)

    return answer


def close(a: float, b: float, tol: float = 1e-9) -> bool:
    return math.isclose(a, b, abs_tol=tol)
