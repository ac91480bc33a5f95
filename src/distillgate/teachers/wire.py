"""OpenAI wire format <-> engine objects: parse request bodies, build ``chat.completion`` / chunk / completion dicts.

Bad request bodies raise ``UpstreamError(status=400)`` naming every bad field, as base.py asks of backends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distillgate.errors import UpstreamError
from distillgate.teachers.engine import MAX_TOP_LOGPROBS, Generation, SamplingParams, TokenLogprob

MAX_N = 16
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
_ROLES = ("system", "user", "assistant", "developer", "tool")
# accepted and ignored: they change nothing about a local model's answer
_IGNORED = {"model", "user", "metadata", "store", "stream_options", "frequency_penalty", "presence_penalty",
            "parallel_tool_calls", "service_tier", "extra_body"}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    params: SamplingParams
    n: int
    stream: bool


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str]
    params: SamplingParams
    n: int
    echo: bool


def _bad(problems: list[str]) -> UpstreamError:
    return UpstreamError("invalid request body: " + "; ".join(problems), status=400,
                         hint="see the OpenAI chat-completions reference for the accepted values")


def _number(body: Mapping[str, Any], key: str, default: float, problems: list[str]) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{key} must be a number (got {value!r})")
        return default
    return float(value)


def _integer(body: Mapping[str, Any], key: str, default: int | None, problems: list[str]) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{key} must be an integer (got {value!r})")
        return default
    return value


def _sampling(body: Mapping[str, Any], default_max: int, problems: list[str], *, chat: bool) -> SamplingParams:
    max_tokens = _integer(body, "max_completion_tokens", None, problems)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max, problems)
    stop_raw = body.get("stop")
    stop: tuple[str, ...] = ()
    if isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = tuple(stop_raw)
    elif stop_raw is not None:
        problems.append("stop must be a string or a list of up to 4 strings")
    if chat:
        logprobs_raw = body.get("logprobs")
        if logprobs_raw is not None and not isinstance(logprobs_raw, bool):
            problems.append("logprobs must be true or false")
        want = bool(logprobs_raw)
        top = _integer(body, "top_logprobs", 0, problems) or 0
        if top and not want:
            problems.append("top_logprobs needs logprobs: true")
    else:
        top = _integer(body, "logprobs", None, problems) or 0
        want = body.get("logprobs") is not None
        if top > 5:
            problems.append("logprobs (completions) must be in [0, 5]")
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max,
        temperature=_number(body, "temperature", 1.0, problems),
        top_p=_number(body, "top_p", 1.0, problems),
        seed=_integer(body, "seed", None, problems),
        stop=stop,
        logprobs=want,
        top_logprobs=top,
    )
    if params.max_tokens < 1:
        problems.append(f"max_tokens must be >= 1 (got {params.max_tokens})")
    if not 0.0 <= params.temperature <= 2.0:
        problems.append(f"temperature must be in [0, 2] (got {params.temperature})")
    if not 0.0 < params.top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1] (got {params.top_p})")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        problems.append(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {params.top_logprobs})")
    if len(stop) > 4 or any(not s for s in stop):
        problems.append("stop takes at most 4 non-empty strings")
    return params


def _n(body: Mapping[str, Any], problems: list[str]) -> int:
    n = _integer(body, "n", 1, problems)
    if n is None or not 1 <= n <= MAX_N:
        problems.append(f"n must be in [1, {MAX_N}] (got {n})")
        n = 1
    return n


def _content(value: Any, where: str, problems: list[str]) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                problems.append(f"{where}.content[{i}]: only text parts are supported by a local text model")
        return "".join(parts)
    if value is None:
        return ""
    problems.append(f"{where}.content must be a string or a list of text parts")
    return ""


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; every problem is reported at once."""
    problems: list[str] = []
    for key in ("tools", "functions", "tool_choice", "audio", "modalities", "prediction"):
        if body.get(key) is not None:
            problems.append(f"{key} is not supported by the local teacher")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        problems.append("response_format other than {'type': 'text'} is not supported by the local teacher")
    raw = body.get("messages")
    messages: list[dict[str, str]] = []
    if not isinstance(raw, list) or not raw:
        problems.append("messages must be a non-empty list")
    else:
        for i, msg in enumerate(raw):
            if not isinstance(msg, Mapping) or msg.get("role") not in _ROLES:
                problems.append(f"messages[{i}] needs a role in {list(_ROLES)}")
                continue
            role = "system" if msg["role"] == "developer" else str(msg["role"])
            messages.append({"role": role, "content": _content(msg.get("content"), f"messages[{i}]", problems)})
    params = _sampling(body, DEFAULT_CHAT_MAX_TOKENS, problems, chat=True)
    n = _n(body, problems)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        problems.append("stream must be true or false")
    if problems:
        raise _bad(problems)
    return ChatRequest(messages, params, n, bool(stream))


def parse_completion(body: Mapping[str, Any]) -> CompletionRequest:
    """Validate a legacy ``/v1/completions`` body."""
    problems: list[str] = []
    raw = body.get("prompt")
    prompts: list[str] = []
    if isinstance(raw, str):
        prompts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        prompts = list(raw)
    else:
        problems.append("prompt must be a string or a non-empty list of strings")
    if body.get("stream"):
        problems.append("stream is not supported on /v1/completions by the local teacher; use chat completions")
    params = _sampling(body, DEFAULT_COMPLETION_MAX_TOKENS, problems, chat=False)
    n = _n(body, problems)
    if problems:
        raise _bad(problems)
    return CompletionRequest(prompts, params, n, bool(body.get("echo", False)))


def choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice ``j`` of ``n`` samples with seed ``seed + j``: distinct yet reproducible."""
    if params.seed is None or choice == 0:
        return params
    return SamplingParams(params.max_tokens, params.temperature, params.top_p, params.seed + choice,
                          params.stop, params.logprobs, params.top_logprobs)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _entry(lp: TokenLogprob | tuple[int, str, float]) -> dict[str, Any]:
    token, logprob = (lp.token, lp.logprob) if isinstance(lp, TokenLogprob) else (lp[1], lp[2])
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {"content": [{**_entry(lp), "top_logprobs": [_entry(t) for t in lp.top]} for lp in logprobs],
            "refusal": None}


def usage(prompt_tokens: int, gens: Sequence[Generation]) -> dict[str, int]:
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


MAX_LABEL_CHOICES = 512


def parse_label_choices(raw: Any) -> list[str]:
    """``label_choices`` (a distillgate extension): the answer is the most probable of these labels."""
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x.strip() for x in raw):
        raise _bad(["label_choices must be a non-empty list of non-empty strings"])
    if len(raw) > MAX_LABEL_CHOICES or len(set(raw)) != len(raw):
        raise _bad([f"label_choices must hold at most {MAX_LABEL_CHOICES} distinct labels"])
    return [str(x) for x in raw]


#: ``label_score`` (a distillgate extension next to ``label_choices``): how a label's token log-probabilities combine
LABEL_SCORES = ("sum", "mean")


def parse_label_score(raw: Any) -> bool:
    """``label_score``: ``"sum"`` (default) or ``"mean"``; returns whether to length-normalise."""
    if raw is None:
        return False
    if raw not in LABEL_SCORES:
        raise _bad([f"label_score must be one of {', '.join(LABEL_SCORES)} (got {raw!r})"])
    return bool(raw == "mean")


def label_response(model: str, fingerprint: str, probs: Mapping[str, float], prompt_tokens: int,
                   completion_tokens: int) -> dict[str, Any]:
    """A chat.completion whose content is the most probable label; ``label_probs`` rides on the choice."""
    best = max(probs, key=lambda k: probs[k])
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": best, "refusal": None},
                     "logprobs": None, "finish_reason": "stop", "label_probs": dict(probs)}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chat_response(model: str, fingerprint: str, gens: Sequence[Generation]) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": g.text, "refusal": None},
             "logprobs": chat_logprobs(g.logprobs), "finish_reason": g.finish_reason}
            for i, g in enumerate(gens)
        ],
        "usage": usage(gens[0].prompt_tokens if gens else 0, gens),
    }


def chunk(cid: str, created: int, model: str, fingerprint: str, choices: list[dict[str, Any]],
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": fingerprint, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def completion_response(model: str, fingerprint: str, prompts: Sequence[str], n: int,
                        gens: Sequence[Generation], echo: bool) -> dict[str, Any]:
    choices = []
    for i, g in enumerate(gens):
        prompt = prompts[i // n]
        logprobs = None
        if g.logprobs is not None:
            logprobs = {"tokens": [lp.token for lp in g.logprobs],
                        "token_logprobs": [lp.logprob for lp in g.logprobs],
                        "top_logprobs": [{t[1]: t[2] for t in lp.top} for lp in g.logprobs],
                        "text_offset": []}
        choices.append({"index": i, "text": (prompt + g.text) if echo else g.text, "logprobs": logprobs,
                        "finish_reason": g.finish_reason})
    prompt_tokens = sum(gens[i * n].prompt_tokens for i in range(len(prompts)))
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": choices, "usage": usage(prompt_tokens, gens)}
