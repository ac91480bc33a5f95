"""Prometheus metrics of one gateway instance (its own registry: no process-global state)."""

from __future__ import annotations

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

    def labelled(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, memoised: the request path asks for the same few children every time."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
