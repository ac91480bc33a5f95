"""Provenance stamps cover every field a dataset row keeps; a saved stream verifies with ``stamp verify``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from _adversarial import Target, serve_target
from click.testing import CliRunner

from distillgate.cli.main import cli
from distillgate.errors import DistillgateError

MSG = [{"role": "user", "content": "the card was lost yesterday"}]
TOOLS = [{"type": "function", "function": {"name": "block_card", "parameters": {"type": "object"}}}]

@pytest.fixture()
def target(tmp_path: Path) -> Iterator[Target]:
    with serve_target(tmp_path) as t:
        yield t



def _verify(target: Target, tmp_path: Path, name: str, data: bytes) -> tuple[int, str]:
    pem = tmp_path / "pub.pem"
    if not pem.exists():
        key = target.gateway.store.signer.public_key_pem()
        pem.write_bytes(key if isinstance(key, bytes) else key.encode())
    path = tmp_path / name
    path.write_bytes(data)
    result = CliRunner().invoke(cli, ["stamp", "verify", str(path), "--public-key", str(pem)])
    if isinstance(result.exception, DistillgateError):  # what `distillgate` exits with (cli.main maps the tree)
        return result.exception.exit_code, result.output + str(result.exception)
    return result.exit_code, result.output


def _choice(doc: dict[str, Any]) -> dict[str, Any]:
    choice: dict[str, Any] = doc["choices"][0]
    return choice


EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "content": lambda d: _choice(d)["message"].update(content="edited"),
    "logprob": lambda d: _choice(d)["logprobs"]["content"][0].update(logprob=-9.0),
    "top_logprobs": lambda d: _choice(d)["logprobs"]["content"][0]["top_logprobs"][1].update(logprob=-0.01),
    "label_probs": lambda d: _choice(d).update(label_probs={"card_lost": 0.99}),
    "tool_calls": lambda d: _choice(d)["message"].update(
        tool_calls=[{"id": "c", "type": "function", "function": {"name": "block_card", "arguments": "{}"}}]),
    "model": lambda d: d.update(model="fake-teacher-large"),
    "finish_reason": lambda d: _choice(d).update(finish_reason="length"),
}


def test_editing_any_kept_field_of_an_answer_fails_stamp_verify(target: Target, tmp_path: Path) -> None:
    resp = target.chat({"messages": MSG, "logprobs": True, "top_logprobs": 3, "label_choices": ["card_lost", "x"]})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["choices"][0]["label_probs"] and doc["choices"][0]["logprobs"]["content"]
    code, out = _verify(target, tmp_path, "ok.json", resp.content)
    assert code == 0 and "response hash ok" in out, out
    failed = {}
    for name, edit in EDITS.items():
        edited = copy.deepcopy(doc)
        edit(edited)
        failed[name] = _verify(target, tmp_path, f"{name}.json", orjson.dumps(edited))[0]
    assert failed == {name: 2 for name in EDITS}


def test_editing_a_tool_call_fails_stamp_verify(target: Target, tmp_path: Path) -> None:
    resp = target.chat({"messages": MSG, "tools": TOOLS, "tool_choice": "required"})
    doc = resp.json()
    call = doc["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "block_card"
    assert _verify(target, tmp_path, "ok.json", resp.content)[0] == 0
    call["function"]["arguments"] = '{"query": "someone else"}'
    assert _verify(target, tmp_path, "edited.json", orjson.dumps(doc))[0] == 2


def _stream(target: Target, body: dict[str, Any]) -> bytes:
    full = {"model": "fake-teacher", "stream": True, **body}
    with httpx.stream("POST", target.url + "/v1/chat/completions", json=full, headers=target.headers(),
                      timeout=20) as resp:
        assert resp.status_code == 200
        return resp.read()


@pytest.mark.parametrize("kind", ["text", "tool_call"])
def test_a_saved_stream_verifies_and_an_edited_one_does_not(target: Target, tmp_path: Path, kind: str) -> None:
    body: dict[str, Any] = {"messages": MSG, "logprobs": True, "top_logprobs": 2}
    if kind == "tool_call":
        body.update(tools=TOOLS, tool_choice="required")
    raw = _stream(target, body)
    code, out = _verify(target, tmp_path, "stream.txt", raw)
    assert code == 0 and "response hash ok" in out, out
    needle = b'"arguments":"' if kind == "tool_call" else b'"content":" card"'
    assert needle in raw
    edited = raw.replace(b'"arguments":"', b'"arguments":"x', 1) if kind == "tool_call" else \
        raw.replace(b'"content":" card"', b'"content":" cart"', 1)
    assert _verify(target, tmp_path, "edited.txt", edited)[0] == 2
    dropped = b"\n\n".join(part for i, part in enumerate(raw.split(b"\n\n")) if i != 2)  # a chunk removed
    assert _verify(target, tmp_path, "dropped.txt", dropped)[0] == 2
