"""``local/...`` models go to an in-process Teacher, loaded lazily once; failures to load are a clear 404."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import openai
import pytest

from _gateway_support import MAIN_POLICY, free_port, serve_in_thread, write_policies
from distillgate.errors import NotFoundError
from distillgate.gateway.app import Gateway
from distillgate.gateway.screens import load_screens
from distillgate.gateway.upstreams import Router
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy import load_policies
from distillgate.teachers.base import Teacher, TeacherCard


class UpperTeacher(Teacher):
    """An in-process teacher that shouts the last user message back."""

    def __init__(self, name: str) -> None:
        self.model_name = name

    def _text(self, body: Mapping[str, Any]) -> str:
        return str(body["messages"][-1]["content"]).upper()

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        text = self._text(body)
        return {"id": "local-1", "object": "chat.completion", "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": len(text.split()),
                          "total_tokens": 3 + len(text.split())}}

    async def stream_chat_completion(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for word in self._text(body).split():
            yield {"id": "local-2", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
        yield {"id": "local-2", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield {"id": "local-2", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    def card(self) -> TeacherCard:
        return TeacherCard(model_id=self.model_name, backend="test")


def test_local_teacher_is_loaded_once_and_served(tmp_path: Path) -> None:
    loads: list[str] = []

    def loader(spec: str) -> Teacher:
        loads.append(spec)
        if spec != "local/upper":
            raise NotFoundError(f"no local teacher {spec!r}")
        return UpperTeacher(spec)

    db = tmp_path / "gw.db"
    ks = KeyStore(db)
    key = ks.create("alice")[1]
    policy = {**MAIN_POLICY, "approved_models": ["local/*"]}
    store = Store.open(db)
    gateway = Gateway(policies=load_policies(write_policies(tmp_path / "p", policy)), store=store, keys=ks,
                      router=Router({}, local_models={"upper": "local/upper", "broken": "local/missing"},
                                    local_loader=loader), screens=load_screens())
    port = free_port()
    headers = {"X-Policy-User": "alice", "X-Policy-Project": "proj-a", "X-Policy-Run": "r",
               "X-Policy-Output-Type": "summaries"}
    try:
        with serve_in_thread(gateway, port):
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                              default_headers=headers)
            msgs = [{"role": "user", "content": "quiet words"}]
            assert c.chat.completions.create(model="local/upper", messages=msgs).choices[0].message.content \
                == "QUIET WORDS"
            streamed = list(c.chat.completions.create(model="local/upper", messages=msgs, stream=True))
            assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == "QUIET WORDS "
            with pytest.raises(openai.NotFoundError) as info:  # not registered: refused before admission
                c.chat.completions.create(model="local/missing", messages=msgs)
            assert "local/missing" in info.value.message
            with pytest.raises(openai.InternalServerError) as failed:  # registered, but its spec fails to load
                c.chat.completions.create(model="local/broken", messages=msgs)
            assert failed.value.status_code == 503 and "local/missing" not in failed.value.message
            assert loads == ["local/upper", "local/missing"]  # loaded once, however often it is used
            assert [e.body.get("outcome") for e in store.entries(kind="settlement")] == \
                ["ok", "ok", "gateway_error"]
    finally:
        store.close()
        ks.close()


def test_a_model_name_is_routed_once_and_an_unknown_one_is_refused_every_time() -> None:
    from distillgate.gateway.errors import ApiError
    from distillgate.teachers.http import HttpUpstreamConfig

    router = Router({"a": HttpUpstreamConfig(name="a", base_url="http://127.0.0.1:9/v1"),
                     "b": HttpUpstreamConfig(name="b", base_url="http://127.0.0.1:9/v1")},
                    {"gpt-*": "a"}, local_models={"upper": "local/upper"})
    first = router.route("gpt-4")
    assert router.route("gpt-4") is first and first.upstream_name == "a"
    assert router.route("b/m").upstream_name == "b" and router.route("local/upper").upstream_model == "upper"
    a, b = router.http(first), router.http(router.route("b/m"))
    assert a is not None and b is not None and a is not b
    assert router.http(router.route("local/upper")) is None  # loaded by get(), off the event loop
    for _ in range(2):
        with pytest.raises(ApiError) as err:
            router.route("nobody-serves-this")
        assert err.value.status == 404
