"""Parse and validate OpenAI request bodies; pull out the policy identity.

Everything the gateway needs to judge a request is read here once: the model, ``n``, ``max_tokens``, logprob and
logit-bias settings, the prompt text (for screens), an upper bound of the prompt's tokens, and the identity
(headers win over the body's ``metadata``). Identity keys are stripped from ``metadata`` before the body is
forwarded. A body that is not what the OpenAI API accepts is answered with a 400 naming the bad field (``param``):
always *before* admission, so nothing is reserved or logged for it (a body nested too deeply to be written back,
a model name with spaces or control characters, ...).

The prompt bound (``prompt_tokens``) is the UTF-8 size of the forwarded body plus a small constant: every token of
a byte-level or byte-fallback tokenizer covers at least one byte of what it encodes, and the body holds every
string the teacher can tokenize (messages, tool schemas, response format) plus the JSON around it, which outweighs
the chat template's per-message tokens. So the reservation ``prompt_tokens + max_tokens * n`` is an upper bound of
what an honest upstream can report; what an upstream reports above it is recorded as an overrun at settlement.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from distillgate.gateway.errors import ApiError
from distillgate.policy import prompt_text

IDENTITY_KEYS = {"policy_user": "x-policy-user", "policy_project_id": "x-policy-project",
                 "policy_run_id": "x-policy-run", "policy_output_type": "x-policy-output-type"}
RUN_SIZE_KEY, RUN_SIZE_HEADER = "policy_run_size", "x-policy-run-size"
MAX_RUN_SIZE = 10**9
ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
MAX_N = 128
MAX_TOKENS_CAP = 10_000_000
#: tokens a chat template adds beyond the body's bytes (BOS, the assistant turn's header)
TEMPLATE_TOKENS = 16
#: nesting levels the decision log adds around a body it records (entry → content → request → body), and spare
_LOG_NESTING = 8
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(slots=True)
class Inbound:
    """A validated request."""

    route: str  # "chat" | "completions"
    body: dict[str, Any]  # what is forwarded (identity metadata stripped)
    model: str
    stream: bool
    n: int
    max_tokens: int | None
    prompt: str
    prompt_tokens: int
    top_logprobs: int | None
    logit_bias_size: int
    user: str | None
    project: str | None
    run: str | None
    output_type: str | None
    include_usage: bool
    run_size: int | None = None  # records the run declares it will ask for (X-Policy-Run-Size): extraction volume


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # JSON does not tell 3 from 3.0
        value = int(value)
        body[key] = value
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(f"'{key}' must be an integer between {lo} and {hi}, got {value!r}", key)
    return value


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(f"'{key}' must be a number between {lo} and {hi}, got {value!r}", key)


def _type(body: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> None:
    value = body.get(key)
    if value is not None and not isinstance(value, types):
        raise _bad(f"'{key}' must be {what}, got {type(value).__name__}", key)


def load_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise _bad("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        if "utf-8" in msg.lower() or "surrogates" in msg.lower():
            raise _bad(f"the request body is not valid UTF-8: {msg}", code="invalid_utf8") from exc
        raise _bad(f"the request body is not valid JSON: {msg}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _identity(headers: Mapping[str, str], metadata: dict[str, Any]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, header in IDENTITY_KEYS.items():
        value = headers.get(header)
        meta_value = metadata.pop(key, None)
        if meta_value is not None and not isinstance(meta_value, str):
            raise _bad(f"metadata.{key} must be a string, got {type(meta_value).__name__}", f"metadata.{key}")
        if value is None:
            value = meta_value
        out[key] = value or None
    return out


def _run_size(headers: Mapping[str, str], metadata: dict[str, Any]) -> int | None:
    """``X-Policy-Run-Size`` or ``metadata.policy_run_size``: a positive integer (the header wins)."""
    meta_value = metadata.pop(RUN_SIZE_KEY, None)
    value: Any = headers.get(RUN_SIZE_HEADER, meta_value)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():  # JSON Schema counts 5.0 as an integer
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RUN_SIZE:
        raise _bad(f"X-Policy-Run-Size / metadata.{RUN_SIZE_KEY} must be a whole number from 1 to {MAX_RUN_SIZE} "
                   f"(the records this run will ask for), got {value!r}", f"metadata.{RUN_SIZE_KEY}")
    return value


def prompt_token_bound(body: dict[str, Any]) -> int:
    """An upper bound of the prompt tokens any tokenizer makes of ``body`` (see the module docstring).

    Raises a 400 for a body that cannot be written back as JSON with the log's nesting around it (orjson reads
    1,024 levels but writes 254): such a body could be neither forwarded nor logged.
    """
    wrapped: Any = body
    for _ in range(_LOG_NESTING):
        wrapped = [wrapped]
    try:
        size = len(orjson.dumps(wrapped)) - 2 * _LOG_NESTING
    except orjson.JSONEncodeError as exc:
        raise _bad(f"the request body is nested too deeply to be forwarded or logged ({exc}); flatten 'metadata' "
                   "and other nested values", code="invalid_request") from exc
    return size + TEMPLATE_TOKENS


def parse_request(route: str, raw: bytes, headers: Mapping[str, str]) -> Inbound:
    """Validate a ``/v1/chat/completions`` (route "chat") or ``/v1/completions`` body."""
    body = load_body(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("'model' is required and must be a non-empty string", "model")
    if model != model.strip() or _CONTROL.search(model) is not None:
        raise _bad(f"'model' must be a model name without surrounding spaces or control characters, got {model!r}",
                   "model", code="invalid_model")
    if route == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' is required and must be a non-empty array", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
            role = m.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise _bad(f"messages[{i}].role must be one of {sorted(ROLES)}, got {m.get('role')!r}",
                           f"messages[{i}].role")
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise _bad(f"messages[{i}].content must be a string, an array of parts or null",
                           f"messages[{i}].content")
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _bad("'logprobs' must be a boolean", "logprobs")
        top = _int(body, "top_logprobs", 0, 20) if "top_logprobs" in body else None
        if top is not None and not logprobs:
            raise _bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
        if "tools" in body:
            _type(body, "tools", list, "an array")
        if "response_format" in body:
            _type(body, "response_format", dict, "an object")
        max_tokens = _int(body, "max_completion_tokens", 1, MAX_TOKENS_CAP) if "max_completion_tokens" in body \
            else None
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", 1, MAX_TOKENS_CAP)
    else:
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                            and all(isinstance(p, str) for p in prompt))):
            raise _bad("'prompt' is required and must be a string or an array of strings", "prompt")
        top = _int(body, "logprobs", 0, 5)
        max_tokens = _int(body, "max_tokens", 1, MAX_TOKENS_CAP)
    # an optional field's helper runs only when the key is there (each reads null as absent)
    n = (_int(body, "n", 1, MAX_N) if "n" in body else None) or 1
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if "temperature" in body:
        _number(body, "temperature", 0, 2)
    if "top_p" in body:
        _number(body, "top_p", 0, 1)
    if "stop" in body:
        _type(body, "stop", (str, list), "a string or an array of strings")
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in bias.values())):
        raise _bad("'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise _bad("'metadata' must be an object", "metadata")
    ident = _identity(headers, metadata)
    run_size = _run_size(headers, metadata)
    if "metadata" in body:
        if metadata:
            body["metadata"] = metadata
        else:
            del body["metadata"]
    text = prompt_text(body)
    # positional, in field order (a test checks each field by name): with 16 keywords the call cost 2.8 times as
    # many instructions, on every request
    return Inbound(route, body, model, stream, n, max_tokens, text, prompt_token_bound(body), top, len(bias or {}),
                   ident["policy_user"], ident["policy_project_id"], ident["policy_run_id"],
                   ident["policy_output_type"], bool(stream_options and stream_options.get("include_usage")),
                   run_size)
