"""``LocalMonitor``: the ``Monitor`` seam over an ``ExtractionMonitor`` in the gateway's own process.

Never silently blind: when the embedder's queue is full, a request waits (without blocking the event loop) up to
``embed_wait_s`` for room: back-pressure that slows clients to what the embedder can read. A request whose prompt
still cannot be queued is answered normally but its decision entry says ``"unobserved": "embed_backlog"`` and
``dropped`` counts it; nothing is skipped without a recorded reason.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from distillgate.extraction.features import RequestFeatures
from distillgate.extraction.monitor import ExtractionMonitor, log_extra
from distillgate.extraction.seam import MonitorStatus, Observation

_POLL_S = 0.002


class LocalMonitor:
    def __init__(self, monitor: ExtractionMonitor, *, embed_wait_s: float = 5.0) -> None:
        self.monitor = monitor
        self.embed_wait_s = embed_wait_s
        self._ready = monitor.embedder is None
        self._starting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._ready:
            return
        if self._starting is None:
            self._starting = asyncio.create_task(asyncio.to_thread(self._warm))
        await asyncio.shield(self._starting)
        self._ready = True

    def _warm(self) -> None:
        """Load the embedder's model before the first request needs it (MiniLM takes seconds to load)."""
        assert self.monitor.embedder is not None
        self.monitor.embedder.embed(["warm up"])

    async def observe(self, features: RequestFeatures) -> Observation:
        if not self._ready:
            await self.start()
        m = self.monitor
        sketch, split = m.prepare(features)
        signals, job = m.judge(sketch, split)
        if job is not None and not m.submit(job):
            deadline = time.monotonic() + self.embed_wait_s
            queued = False
            while time.monotonic() < deadline:  # back-pressure, off the loop: this request waits, others run
                await asyncio.sleep(_POLL_S)
                if m.submit(job):
                    queued = True
                    break
            if not queued:
                m.count_dropped()
                sketch = replace(sketch, unobserved="embed_backlog")
        embedding = None
        if m.records_embeddings(features.project):  # policy extraction.record_embeddings: for audit scan
            embedding = await asyncio.to_thread(m.embed_for_record, features)
        return signals, log_extra(features, signals, embedding, sketch)

    def status(self) -> MonitorStatus:
        return MonitorStatus(ready=self._ready, backlog=self.monitor.backlog, dropped=self.monitor.dropped)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued embedding has been applied (replays and tests)."""
        self.monitor.drain(timeout)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.monitor.close)

    def close(self) -> None:
        self.monitor.close()
