"""Build a gateway from its configuration and serve it with uvicorn (uvloop + httptools).

Why uvicorn with uvloop/httptools: see ``benchmarks/gateway.py`` and docs/gateway.md (it is the fastest ASGI server
installed here that supports streaming and lifespan; the gateway's cost is dominated by the durable log write, not
the HTTP layer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["build_gateway", "build_monitor", "serve"]  # build_monitor: now distillgate.extraction.settings

from distillgate.extraction.local import LocalMonitor
from distillgate.extraction.process import MonitorProcess
from distillgate.extraction.seam import Monitor
from distillgate.extraction.settings import build_monitor
from distillgate.gateway.app import Gateway
from distillgate.gateway.config import GatewayConfig
from distillgate.gateway.metrics import Metrics
from distillgate.gateway.routes import Cascade, read_threshold
from distillgate.gateway.screens import load_screens
from distillgate.gateway.shadow import ShadowLog
from distillgate.gateway.upstreams import Router
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy import load_policies
from distillgate.teachers.base import Teacher


def build_gateway(config: GatewayConfig, *, local_loader: Callable[[str], Teacher] | None = None) -> Gateway:
    """``local_loader(spec)`` builds ``local/...`` teachers (default: the teachers registry); ``distillgate run``
    passes one that serves its retrieval teacher."""
    policies = load_policies(config.policy)
    screens = load_screens(config.screens)
    monitor: Monitor
    if config.extraction.process:  # the child builds the same monitor from the same files
        monitor = MonitorProcess(str(config.policy), config.extraction.model_dump(exclude={"process"}), policies,
                                 db=config.db)
    else:
        monitor = LocalMonitor(build_monitor(policies, config.extraction, config.db),
                               embed_wait_s=config.extraction.embed_wait_s)
    router = Router({name: up.to_http(name) for name, up in config.upstreams.items()}, config.models,
                    local_models=config.local_models, local_loader=local_loader, students=config.students)
    cascade = build_cascade(config, router)  # before the store opens: a bad threshold file leaks nothing
    store = Store.open(config.db, reservation_ttl_s=config.reservation_ttl_s,
                       checkpoint_every=policies.checkpoint_every(), witness=config.witness)
    keys = KeyStore(config.db)
    return Gateway(policies=policies, store=store, keys=keys, router=router, screens=screens,
                   max_body_bytes=config.max_body_bytes, reclaim_interval_s=config.reclaim_interval_s,
                   settle_before_reply=config.settle == "before_reply", monitor=monitor,
                   max_header_bytes=config.max_header_bytes, body_timeout_s=config.body_timeout_s,
                   max_body_readers=config.max_body_readers, cascade=cascade)


def build_cascade(config: GatewayConfig, router: Router) -> Callable[[Metrics], Cascade] | None:
    """The routes of ``config`` (thresholds read now, so a bad file stops the start), or None without routes."""
    if not config.routes:
        return None
    thresholds = {name: read_threshold(r, f"routes.{name}") for name, r in config.routes.items()}
    return lambda metrics: Cascade(config.routes, thresholds, router.student, ShadowLog(config.db),
                                   metrics.registry, artefacts=config.students)


def uvicorn_options(config: GatewayConfig) -> dict[str, Any]:
    """uvicorn's settings for the gateway (one process or each ``--workers`` worker)."""
    return {"host": config.host, "port": config.port, "loop": "uvloop", "lifespan": "on",
            "access_log": config.access_log, "log_level": "info", "timeout_keep_alive": 30, "backlog": 2048,
            "limit_concurrency": config.max_connections,
            "proxy_headers": False}  # the gateway reads no client address: skip X-Forwarded-* parsing


def close_gateway(gateway: Gateway) -> None:
    gateway.monitor.close()
    gateway.store.close()
    gateway.keys.close()
    if gateway.cascade is not None:
        gateway.cascade.close()


def serve(config: GatewayConfig) -> None:
    """Serve until interrupted; ``config.workers`` > 1: that many processes on one socket (gateway/workers.py),
    exiting with status 1 when a worker cannot start."""
    if config.workers > 1:
        from distillgate.gateway.workers import supervise

        code = supervise(config, config.workers)
        if code:
            raise SystemExit(code)
        return
    import uvicorn

    from distillgate.gateway.protocol import gateway_protocol  # imports uvicorn

    gateway = build_gateway(config)
    try:  # httptools, with the head bounded as it arrives and JSON for malformed HTTP (gateway/protocol.py)
        uvicorn.run(gateway, http=gateway_protocol(config.max_header_bytes), **uvicorn_options(config))
    finally:
        close_gateway(gateway)
