"""Prometheus metrics of one gateway instance (its own registry: no process-global state)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("distillgate_requests_total", "HTTP requests answered", ["route", "status"],
                                registry=r)
        self.decisions = Counter("distillgate_decisions_total", "Policy decisions", ["decision"], registry=r)
        self.reasons = Counter("distillgate_decision_reasons_total", "Reason codes in decisions", ["code"],
                               registry=r)
        self.latency = Histogram("distillgate_request_seconds", "Time from request to last byte", ["route"],
                                 buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        self.upstream_errors = Counter("distillgate_upstream_errors_total", "Upstream failures",
                                       ["upstream", "status"], registry=r)
        self.tokens = Counter("distillgate_tokens_total", "Tokens settled", ["kind"], registry=r)
        self.screen_hits = Counter("distillgate_screen_hits_total", "Prompt screen hits", ["output_class"],
                                   registry=r)
        self.contract_violations = Counter("distillgate_output_contract_violations_total",
                                           "Answers that broke an output contract", ["output_type", "enforcement"],
                                           registry=r)
        self.in_flight = Gauge("distillgate_in_flight_requests", "Requests being handled", registry=r)
        self.settle_errors = Counter("distillgate_settle_errors_total", "Settlements that failed to commit",
                                     registry=r)
        self.embed_backlog = Gauge("distillgate_extraction_embed_backlog",
                                   "Prompts waiting for the extraction monitor's embedder", registry=r)
        self.embed_dropped = Gauge("distillgate_extraction_embeddings_dropped",
                                   "Prompts not embedded because the embedder was behind (since start)", registry=r)
        self.refunds = Counter("distillgate_refunds_total", "Reservations settled by a failure after admission "
                               "(upstream error, client gone, gateway error)", ["outcome"], registry=r)
        self.reclaimed = Counter("distillgate_reservations_reclaimed_total", "Expired reservations refunded",
                                 registry=r)

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._answered: dict[tuple[str, int], tuple[Callable[[float], None], Callable[[float], None]]] = {}
        self._decided: dict[tuple[bool, tuple[str, ...]], tuple[Callable[[float], None], ...]] = {}
        self._tokens: dict[str, Callable[[float], None]] = {}

    def labelled(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, memoised: the request path asks for the same few children every time."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # The request path's own memos (each one dict lookup on plain keys): a child is created on first use, as
    # ``labels()`` would, so /metrics shows the same series at every moment. What is kept is the child's value's
    # own ``inc`` (prometheus_client's ``Counter.inc`` checks the amount's sign and exemplars around it: two Python
    # frames per count, for amounts that are 1 or settled token counts) and, for the latency histogram, its sum and
    # bucket values (``Histogram.observe``, written out: the bucket found by bisection, not a Python loop).
    @staticmethod
    def _counting(child: Any) -> Callable[[float], None]:
        value = getattr(child, "_value", None)
        inc = getattr(value, "inc", None)
        return inc if callable(inc) else child.inc  # type: ignore[no-any-return]

    @staticmethod
    def _observing(child: Any) -> Callable[[float], None]:
        bounds, buckets, total = (getattr(child, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
        if not (isinstance(bounds, list) and isinstance(buckets, list) and len(bounds) == len(buckets)
                and bounds and bounds[-1] == float("inf") and callable(getattr(total, "inc", None))):
            return child.observe  # type: ignore[no-any-return]
        incs = [b.inc for b in buckets]
        sum_inc = total.inc  # type: ignore[union-attr]

        def observe(amount: float) -> None:
            sum_inc(amount)
            i = bisect_left(bounds, amount)  # the first bucket whose bound is >= amount, as observe() finds it
            if i < len(incs):
                incs[i](1)

        return observe

    def answered(self, route: str, status: int, seconds: float) -> None:
        """One answered request: its count by route and status, and its latency by route."""
        key = (route, status)
        pair = self._answered.get(key)
        if pair is None:
            pair = self._answered[key] = (self._counting(self.requests.labels(route, str(status))),
                                          self._observing(self.latency.labels(route)))
        pair[0](1)
        pair[1](seconds)

    def decided(self, allowed: bool, reasons: tuple[str, ...]) -> None:
        """One decision: its count by outcome, and one count per reason code."""
        key = (allowed, reasons)
        children = self._decided.get(key)
        if children is None:
            children = (self._counting(self.decisions.labels("allow" if allowed else "deny")),
                        *[self._counting(self.reasons.labels(code)) for code in reasons])
            if len(self._decided) < 512:  # the combinations of codes seen: a few, but never an unbounded memo
                self._decided[key] = children
        for inc in children:
            inc(1)

    def settled_tokens(self, kind: str, tokens: int) -> None:
        """Tokens settled, by kind (``prompt`` or ``completion``); a negative count is refused as ``inc`` does."""
        inc = self._tokens.get(kind)
        if inc is None:
            inc = self._tokens[kind] = self._counting(self.tokens.labels(kind))
        if tokens < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
