"""The request path's metric memos count exactly what prometheus_client's own calls count."""

from __future__ import annotations

import pytest

from distillgate.gateway.metrics import Metrics


def test_memoised_counts_render_as_the_plain_calls() -> None:
    fast, plain = Metrics(), Metrics()
    cases = [("/v1/chat/completions", 200, 0.0004), ("/v1/chat/completions", 200, 0.001), ("other", 404, 0.02),
             ("/v1/chat/completions", 200, 0.0031), ("/v1/chat/completions", 503, 31.0), ("other", 404, 5.0)]
    for route, status, seconds in cases:
        fast.answered(route, status, seconds)
        plain.requests.labels(route, str(status)).inc()
        plain.latency.labels(route).observe(seconds)
    for allowed, reasons in [(True, ()), (False, ("QUOTA", "AUTH_MISSING")), (False, ("QUOTA", "AUTH_MISSING"))]:
        fast.decided(allowed, reasons)
        plain.decisions.labels("allow" if allowed else "deny").inc()
        for code in reasons:
            plain.reasons.labels(code).inc()
    for kind, tokens in [("prompt", 12), ("completion", 0), ("prompt", 7)]:
        fast.settled_tokens(kind, tokens)
        plain.tokens.labels(kind).inc(tokens)
    with pytest.raises(ValueError):
        fast.settled_tokens("prompt", -1)
    def counts(m: Metrics) -> list[bytes]:  # every series but the creation times
        return [line for line in m.render().splitlines() if b"_created" not in line]

    assert counts(fast) == counts(plain)
