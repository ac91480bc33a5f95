"""Reasoning traces: split a teacher's chat message into its answer and its reasoning, wherever the trace came.

Three shapes are seen in OpenAI-compatible answers, checked in this order:

* a ``reasoning_content`` field beside ``content`` (DeepSeek, vLLM's and llama.cpp's reasoning parsers);
* a ``reasoning`` field (OpenRouter, Ollama; a string, or an object with ``content``/``text``/``summary``);
* ``<think>…</think>`` inside ``content`` (models served without a reasoning parser). Only a block that *opens
  the answer* is a trace (after leading whitespace); a ``<think>`` quoted later in an answer is answer text. A block
  never closed (the answer was cut by ``max_tokens``) is all trace and leaves no answer, so a cut-off thought is
  never taken for the answer.

The answer is returned stripped of the trace and normalised by the caller as if no trace had been there, so the
answer shape never depends on whether the teacher thought aloud.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

TraceSource = Literal["reasoning_content", "reasoning", "think_tags"]
_OPEN = re.compile(r"\A\s*<think>", re.IGNORECASE)
_CLOSE = re.compile(r"</think>", re.IGNORECASE)


@dataclass(frozen=True)
class Traced:
    answer: str
    trace: str | None  # None: the message carried no trace
    source: TraceSource | None
    complete: bool = True  # False: a <think> block was never closed

    def as_dict(self) -> dict[str, Any]:
        return {"trace": self.trace, "source": self.source, "complete": self.complete,
                "chars": len(self.trace or "")}


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        for key in ("content", "text", "summary"):
            if isinstance(value.get(key), str):
                return str(value[key])
    if isinstance(value, list):
        parts = [t for t in (_text(v) for v in value) if t]
        return "\n".join(parts) if parts else None
    return None


def split_think(content: str) -> Traced:
    """``<think>…</think>`` opening ``content``: (answer after it, trace inside it)."""
    opened = _OPEN.match(content)
    if not opened:
        return Traced(content, None, None)
    rest = content[opened.end():]
    closed = _CLOSE.search(rest)
    if closed is None:
        return Traced("", rest.strip(), "think_tags", complete=False)
    return Traced(rest[closed.end():].strip(), rest[:closed.start()].strip(), "think_tags")


def split_message(message: Mapping[str, Any]) -> Traced:
    """The answer and the trace of one chat ``message`` (a dict of the response's ``choices[i].message``)."""
    content = message.get("content")
    answer = content if isinstance(content, str) else ""
    for field in ("reasoning_content", "reasoning"):
        trace = _text(message.get(field))
        if trace:
            source: TraceSource = "reasoning_content" if field == "reasoning_content" else "reasoning"
            return Traced(split_think(answer).answer if _OPEN.match(answer) else answer, trace.strip(), source)
    return split_think(answer)
