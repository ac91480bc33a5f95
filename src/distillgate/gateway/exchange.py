"""One request's state on its way through the gateway's layers, and the reservation it holds once admitted.

``Exchange`` is filled in order by parse → identify → judge → admit → forward → settle → stamp; each layer reads
what the earlier ones wrote (the policy is chosen once, in identify, and passed to the store with the request).

``Ticket`` is the admitted request's reservation, used as ``async with``: it is settled or refunded exactly once on
every way out. The happy path calls :meth:`Ticket.settle`; any exception that leaves the block (the upstream
failed, the client went away, a bug, a cancellation) refunds at once what was not used, with the outcome and the
error in the settlement entry. While the block runs, the ticket's reservation is in the gateway's in-flight set,
whose leases the reclaim loop renews, so a long stream is never reclaimed under it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from distillgate.errors import UpstreamError
from distillgate.gateway.answer import StreamAssembly
from distillgate.gateway.parse import Inbound
from distillgate.gateway.routes import Choice
from distillgate.gateway.upstreams import Route
from distillgate.keys import KeyCheck
from distillgate.ledger.store import Admission, LogEntry, Store
from distillgate.policy import Policy, Request

_log = logging.getLogger("distillgate.gateway")


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


@dataclass(slots=True)
class Exchange:
    route_name: str  # "chat" | "completions"
    raw: bytes
    headers: dict[str, str]
    inb: Inbound
    request_hash: str
    check: KeyCheck | None = None
    route: Route | None = None
    policy: Policy | None = None
    request: Request | None = None
    extra: dict[str, object] = field(default_factory=dict)
    admission: Admission | None = None
    #: what the upstream said so far (streams: as it arrives), for the stamp and for charging a failure
    assembly: StreamAssembly | None = None
    #: a routed model name (gateway/routes.py): the teacher's route, the choice made, the model that answers
    teacher_route: Route | None = None
    choice: Choice | None = None
    answered_by: str | None = None


def _outcome(exc: BaseException) -> tuple[str, dict[str, Any]]:
    if isinstance(exc, UpstreamError):
        return ("timeout" if exc.status == 504 else "upstream_error",
                {"error": exc.message[:500], "upstream_status": exc.status})
    if isinstance(exc, ClientGone):
        return "client_disconnected", {}
    if isinstance(exc, asyncio.CancelledError):
        return "gateway_error", {"error": "the request was cancelled"}
    return "gateway_error", {"error": f"{type(exc).__name__}: {exc}"[:500]}


class Ticket:
    """Settle-or-refund of one reservation (see the module docstring)."""

    def __init__(self, store: Store, admission: Admission, in_flight: set[str],
                 on_refund: Callable[[str], None] | None = None) -> None:
        assert admission.reservation_id is not None
        self.store = store
        self.reservation_id: str = admission.reservation_id
        self.in_flight = in_flight
        self.on_refund = on_refund
        self.closed = False
        #: (prompt_tokens, completion_tokens) known to be used so far, charged if the request fails
        self.used: Callable[[], tuple[int | None, int | None]] = lambda: (None, None)

    async def __aenter__(self) -> Ticket:
        self.in_flight.add(self.reservation_id)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.in_flight.discard(self.reservation_id)
        if self.closed:
            return
        self.closed = True
        outcome, extra = _outcome(exc) if exc is not None else ("gateway_error", {"error": "left unsettled"})
        prompt, completion = self.used()
        try:
            await asyncio.shield(self.store.asettle(
                self.reservation_id, prompt_tokens=prompt, completion_tokens=completion, records=0,
                outcome=outcome, extra=extra))
        except Exception:  # the log is unavailable: reclaim refunds it once the lease lapses
            _log.exception("could not refund reservation %s after %s", self.reservation_id, outcome)
        if self.on_refund is not None:
            self.on_refund(outcome)

    def settle(self, **kwargs: Any) -> asyncio.Future[LogEntry]:
        """Submit the settlement now (``Store.asettle`` arguments); the future resolves once it is durable. The
        ticket is closed from here on."""
        self.closed = True
        self.in_flight.discard(self.reservation_id)
        return self.store.submit_settle(self.reservation_id, **kwargs)
