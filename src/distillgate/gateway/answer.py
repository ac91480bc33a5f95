"""The assembled answer: what the teacher said, in the one shape that is hashed into a stamp's ``response_hash``.

A non-streamed answer is its response body. A streamed answer is folded, chunk by chunk, into the same shape
(:class:`StreamAssembly`): per choice the concatenated content deltas, the tool calls merged by their ``index``
(``function.arguments`` concatenated), the logprob lists concatenated, the last ``label_probs`` and
``finish_reason``. ``distillgate stamp verify`` runs the same assembly over a saved SSE stream, so a stream verifies
against the stamp in its last chunk exactly as a saved response body does.

:func:`answer_digest` covers every field a dataset row keeps: per choice its index, content (``message.content`` or
``text``), ``refusal``, ``tool_calls``, ``function_call``, ``logprobs`` (and so ``top_logprobs``), ``label_probs``
and ``finish_reason``, and the answer's ``model``. Editing any of them changes the digest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distillgate.canonical import canonical_json, sha256_hex

DIGEST_VERSION = 2


def _normal_choice(c: Mapping[str, Any]) -> dict[str, Any]:
    msg = c.get("message")
    is_msg = type(msg) is dict or isinstance(msg, Mapping)  # a dict first: the ABC check costs far more
    src: Mapping[str, Any] = msg if is_msg else {}  # type: ignore[assignment]
    return {"index": c.get("index", 0), "text": (src.get("content") if is_msg else c.get("text")) or "",
            "finish_reason": c.get("finish_reason"), "logprobs": c.get("logprobs"),
            "label_probs": c.get("label_probs"), "refusal": src.get("refusal"), "tool_calls": src.get("tool_calls"),
            "function_call": src.get("function_call")}


def answer_digest(choices: Sequence[Mapping[str, Any]], model: Any = None) -> str:
    """sha256 over the canonical JSON of the answer's kept fields (see the module docstring)."""
    norm = sorted((_normal_choice(c) for c in choices), key=lambda x: int(x["index"] or 0))
    return sha256_hex(canonical_json({"v": DIGEST_VERSION, "model": model, "choices": norm}))


def _merge_logprobs(into: dict[str, Any], piece: Mapping[str, Any]) -> None:
    for key, value in piece.items():
        if isinstance(value, list):
            into.setdefault(key, [])
            if isinstance(into[key], list):
                into[key].extend(value)
        elif value is not None or key not in into:
            into[key] = value


def _merge_tool_calls(into: list[dict[str, Any]], deltas: Iterable[Any]) -> None:
    for d in deltas:
        if not isinstance(d, Mapping):
            continue
        i = int(d.get("index", len(into)))
        while len(into) <= i:
            into.append({})
        call = into[i]
        for key, value in d.items():
            if key == "index":
                continue
            if key == "function" and isinstance(value, Mapping):
                fn = call.setdefault("function", {})
                for fk, fv in value.items():
                    fn[fk] = (fn.get(fk) or "") + fv if isinstance(fv, str) else fv
            elif value is not None:
                call[key] = value


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish_reason: Any = None
    logprobs: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    other: dict[str, Any] = field(default_factory=dict)  # refusal, function_call, label_probs
    pieces: int = 0


@dataclass
class StreamAssembly:
    """Folds SSE chunks (parsed JSON) into choices; :meth:`choices` has the non-streamed shape."""

    chat: bool = True
    upstream_id: str | None = None
    model: Any = None
    usage: dict[str, Any] | None = None
    _choices: dict[int, _Choice] = field(default_factory=dict)

    @property
    def content_chunks(self) -> int:
        return sum(c.pieces for c in self._choices.values())

    def add(self, chunk: Mapping[str, Any]) -> None:
        if self.upstream_id is None and isinstance(chunk.get("id"), str):
            self.upstream_id = chunk["id"]
        if self.model is None and chunk.get("choices") and chunk.get("model") is not None:
            self.model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for c in chunk.get("choices") or []:
            if not isinstance(c, Mapping):
                continue
            st = self._choices.setdefault(int(c.get("index", 0)), _Choice())
            delta = c.get("delta") if self.chat else c
            delta = delta if isinstance(delta, Mapping) else {}
            piece = delta.get("content") if self.chat else delta.get("text")
            if isinstance(piece, str) and piece:
                st.text.append(piece)
                st.pieces += 1
            if self.chat:
                if isinstance(delta.get("tool_calls"), list):
                    st.tool_calls = st.tool_calls or []
                    _merge_tool_calls(st.tool_calls, delta["tool_calls"])
                for key in ("refusal", "function_call"):
                    if delta.get(key) is not None:
                        old = st.other.get(key)
                        new = delta[key]
                        st.other[key] = old + new if isinstance(old, str) and isinstance(new, str) else new
            if isinstance(c.get("logprobs"), Mapping):
                st.logprobs = st.logprobs if st.logprobs is not None else {}
                _merge_logprobs(st.logprobs, c["logprobs"])
            if c.get("label_probs") is not None:
                st.other["label_probs"] = c["label_probs"]
            if c.get("finish_reason") is not None:
                st.finish_reason = c["finish_reason"]

    def choices(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in sorted(self._choices):
            st = self._choices[i]
            text = "".join(st.text)
            choice: dict[str, Any] = {"index": i, "finish_reason": st.finish_reason, "logprobs": st.logprobs}
            if self.chat:
                msg: dict[str, Any] = {"role": "assistant", "content": text}
                if st.tool_calls is not None:
                    msg["tool_calls"] = st.tool_calls
                for key in ("refusal", "function_call"):
                    if key in st.other:
                        msg[key] = st.other[key]
                choice["message"] = msg
            else:
                choice["text"] = text
            if "label_probs" in st.other:
                choice["label_probs"] = st.other["label_probs"]
            out.append(choice)
        return out

    def digest(self) -> str:
        return answer_digest(self.choices(), self.model)


def assemble_sse(text: str) -> tuple[StreamAssembly, dict[str, Any] | None]:
    """A saved SSE stream (``data: {...}`` lines, ``data: [DONE]``) → its assembly and the stamped last chunk."""
    import orjson

    chunks: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        doc = orjson.loads(data)
        if isinstance(doc, dict):
            chunks.append(doc)
    stamped = next((c for c in reversed(chunks) if isinstance(c.get("distillgate"), dict)), None)
    chat = not any(c.get("object") == "text_completion" for c in chunks)
    assembly = StreamAssembly(chat=chat)
    for c in chunks:
        if c is not stamped:
            assembly.add(c)
    return assembly, stamped


def legacy_digest_v1(choices: Sequence[Mapping[str, Any]]) -> str:
    """The ``response_hash`` of version-1 stamps: per choice only index, text and finish_reason."""
    norm = []
    for c in choices:
        msg = c.get("message")
        text = msg.get("content") if isinstance(msg, Mapping) else c.get("text")
        norm.append({"index": c.get("index", 0), "text": text or "", "finish_reason": c.get("finish_reason")})
    norm.sort(key=lambda x: int(x["index"] or 0))
    return sha256_hex(canonical_json(norm))
