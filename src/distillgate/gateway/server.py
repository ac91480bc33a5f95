"""Build a gateway from its configuration and serve it with uvicorn (uvloop + httptools).

Why uvicorn with uvloop/httptools: see ``benchmarks/gateway.py`` and docs/gateway.md (it is the fastest ASGI server
installed here that supports streaming and lifespan; the gateway's cost is dominated by the durable log write, not
the HTTP layer).
"""

from __future__ import annotations

from pathlib import Path

from distillgate.extraction import ExtractionMonitor
from distillgate.extraction.embed import make_embedder, read_reference
from distillgate.extraction.process import MonitorProcess
from distillgate.gateway.app import Gateway
from distillgate.gateway.config import ExtractionSettings, GatewayConfig
from distillgate.gateway.screens import load_screens
from distillgate.gateway.upstreams import Router
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy import PolicySet, load_policies


def build_monitor(policies: PolicySet, settings: ExtractionSettings) -> ExtractionMonitor:
    """The extraction monitor with the configured embedder; each configured reference is embedded now."""
    embedder = None if settings.embedder == "none" else make_embedder(settings.embedder)
    monitor = ExtractionMonitor(policies, embedder=embedder, reference_size=settings.reference_size,
                                embed_cache=settings.embed_cache)
    for project, path in settings.references.items():
        monitor.set_reference(project, read_reference(path))
    return monitor


def build_gateway(config: GatewayConfig) -> Gateway:
    policies = load_policies(config.policy)
    screens = load_screens(config.screens)
    monitor: ExtractionMonitor | MonitorProcess
    if config.extraction.process:  # the child builds the same monitor from the same files
        monitor = MonitorProcess(str(config.policy), config.extraction.model_dump(exclude={"process"}), policies)
    else:
        monitor = build_monitor(policies, config.extraction)
    router = Router({name: up.to_http(name) for name, up in config.upstreams.items()}, config.models,
                    local_models=config.local_models)
    store = Store.open(Path(config.db), reservation_ttl_s=config.reservation_ttl_s)
    keys = KeyStore(config.db)
    return Gateway(policies=policies, store=store, keys=keys, router=router, screens=screens,
                   max_body_bytes=config.max_body_bytes, reclaim_interval_s=config.reclaim_interval_s,
                   settle_before_reply=config.settle == "before_reply", monitor=monitor,
                   max_header_bytes=config.max_header_bytes, body_timeout_s=config.body_timeout_s,
                   max_body_readers=config.max_body_readers)


def serve(config: GatewayConfig) -> None:
    import uvicorn

    gateway = build_gateway(config)
    try:
        uvicorn.run(gateway, host=config.host, port=config.port, loop="uvloop", http="httptools",
                    lifespan="on", access_log=config.access_log, log_level="info",
                    timeout_keep_alive=30, backlog=2048, limit_concurrency=config.max_connections,
                    proxy_headers=False)  # the gateway reads no client address: skip X-Forwarded-* parsing
    finally:
        gateway.monitor.close()
        gateway.store.close()
        gateway.keys.close()
