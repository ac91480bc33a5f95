"""How the gateway turns a parsed request into the ``Request`` that ``decide()`` judges, and a preview of it.

``gateway_request`` is the one place that step happens: the prompt screens run over the prompt, the key's user
stands in for a missing ``policy_user``, and the policy's ``default_max_tokens`` is reserved when a request names
no ``max_tokens``. The gateway calls it for every request; ``policy explain`` and ``policy test`` call ``preview``,
which parses a request file exactly as the gateway parses a body (``parse_request``), then runs the same
``gateway_request`` and ``decide``. So a preview can differ from the gateway only where it must: it assumes a
valid key that belongs to ``policy_user`` (``auth``), and it has no traffic history (no extraction signals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson

from distillgate.errors import ConfigError, ConfigIssue
from distillgate.gateway.errors import ApiError
from distillgate.gateway.parse import IDENTITY_KEYS, Inbound, parse_request
from distillgate.gateway.screens import Screen, run_screens
from distillgate.policy import Policy, PolicySet, Request
from distillgate.policy.decision import Decision, Usage, decide
from distillgate.policy.extraction_rules import Signal


def screen_hits(screens: Sequence[Screen], prompt: str) -> frozenset[str]:
    """The output classes the prompt screens find in ``prompt``."""
    hits = run_screens(screens, prompt) if prompt else ()
    return frozenset([h.output_class for h in hits]) if hits else frozenset()


def gateway_request(inb: Inbound, policy: Policy, *, auth: str, key_user: str | None, hits: frozenset[str],
                    signals: tuple[Signal, ...] = ()) -> Request:
    """The ``Request`` the gateway judges for ``inb`` under ``policy`` (the policy of ``inb.project``)."""
    return Request.quick({
        "user": inb.user or key_user, "project": inb.project, "run": inb.run, "output_type": inb.output_type,
        "model": inb.model, "max_tokens": inb.max_tokens or policy.quotas.default_max_tokens,
        "prompt_tokens": inb.prompt_tokens, "n": inb.n, "auth": auth, "key_user": key_user,
        "top_logprobs": inb.top_logprobs, "logit_bias_size": inb.logit_bias_size, "screen_hits": hits,
        "signals": signals})


def _gateway_body(data: Mapping[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """A request file as the route, body and headers a client would send the gateway."""
    route = "completions" if "prompt" in data and "messages" not in data else "chat"
    body: dict[str, Any] = {"model": data.get("model") or "-"}
    if route == "chat":
        body["messages"] = data.get("messages") or [{"role": "user", "content": ""}]
    else:
        body["prompt"] = data["prompt"]
    for key in ("max_tokens", "n", "logit_bias"):
        if data.get(key):
            body[key] = data[key]
    if data.get("top_logprobs") is not None:
        if route == "chat":
            body["logprobs"], body["top_logprobs"] = True, data["top_logprobs"]
        else:
            body["logprobs"] = data["top_logprobs"]
    headers = {header: str(data[key]) for key, header in IDENTITY_KEYS.items() if data.get(key)}
    return route, orjson.dumps(body), headers


def preview(policies: PolicySet, data: Mapping[str, Any], usage: Usage, screens: Sequence[Screen],
            where: str = "request") -> Decision:
    """The decision the gateway would make for the request file ``data`` (see the module docstring)."""
    request = Request.from_mapping(data)  # unknown keys and bad types are errors, as in any request file
    if request.kind != "inference":  # exports, reviews, datasets: judged by the store alone, not the gateway
        return decide(policies.select(request.project), request, usage)
    route, raw, headers = _gateway_body(data)
    try:
        inb = parse_request(route, raw, headers)
    except ApiError as exc:
        raise ConfigError(where, [ConfigIssue(exc.param or "", f"the gateway would answer {exc.status}: {exc.message}",
                                              "fix the request")]) from exc
    policy = policies.select(inb.project)
    hits = screen_hits(screens, inb.prompt) | frozenset(data.get("screen_hits") or ())
    request = gateway_request(inb, policy, auth="ok", key_user=inb.user, hits=hits)
    if not data.get("model"):  # a request file may leave the model out: then it is not judged
        request = replace(request, model=None)
    if data.get("prompt_tokens") is not None:
        request = replace(request, prompt_tokens=int(data["prompt_tokens"]))
    return decide(policy, request, usage)
