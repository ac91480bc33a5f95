"""``Monitor``: the one protocol the gateway calls, whether the extraction monitor runs in its process
(``LocalMonitor``) or in a child process (``MonitorProcess``).

Modelled on httpx's transport seam: the request path makes one call, ``observe(features)``, which answers the
signals for ``decide()`` and the decision entry's ``extra``; ``status()`` tells ``/healthz`` and ``/metrics`` how it
stands; ``start()`` brings it up (model loaded, references embedded, child answering) and ``aclose()``/``close()``
end it. The gateway never asks which kind it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from distillgate.extraction.features import RequestFeatures
from distillgate.policy.extraction_rules import Signal

Observation = tuple[tuple[Signal, ...], dict[str, object]]  # (signals, the decision entry's extra)


@dataclass(frozen=True)
class MonitorStatus:
    ready: bool  # observe() answers without waiting for a start
    backlog: int  # prompts waiting for the embedder
    dropped: int  # prompts never embedded; each is recorded as unobserved in its decision entry


class Monitor(Protocol):
    async def start(self) -> None:
        """Bring the monitor up; returns when it is ready (raises ``MonitorUnavailable`` when it cannot be)."""
        ...

    async def observe(self, features: RequestFeatures) -> Observation:
        """The signals that fired for this request and its decision entry's ``extra`` (see ``log_extra``)."""
        ...

    def status(self) -> MonitorStatus:
        ...

    async def aclose(self) -> None:
        ...

    def close(self) -> None:
        """Synchronous stop, outside a running event loop."""
        ...
