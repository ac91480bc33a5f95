"""Serve a gateway in this process on a free loopback port (used by `dataset generate` and `distillgate run`)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from distillgate.errors import UpstreamError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def local_gateway(config_data: dict[str, Any], user: str,
                  local_loader: Callable[[str], Any] | None = None) -> Iterator[Any]:
    """Serve a gateway built from ``config_data`` on a free loopback port; yield a ``GatewayTarget``.

    ``local_loader(spec)`` builds the ``local/...`` teachers (see ``build_gateway``).

    A fresh API key for ``user`` is created in the gateway's store and revoked when the block ends.
    """
    import uvicorn

    from distillgate.data.generate import GatewayTarget
    from distillgate.gateway.config import config_from_data
    from distillgate.gateway.protocol import gateway_protocol
    from distillgate.gateway.server import build_gateway
    from distillgate.keys import KeyStore

    port = _free_port()
    config = config_from_data({**config_data, "host": "127.0.0.1", "port": port}, "gateway for generate")
    gateway = build_gateway(config, local_loader=local_loader)
    keys = KeyStore(config.db)
    record, secret = keys.create(user, label="distillgate dataset generate (in-process gateway)")
    server = uvicorn.Server(uvicorn.Config(gateway, host="127.0.0.1", port=port, loop="uvloop",
                                           http=gateway_protocol(config.max_header_bytes), lifespan="on",
                                           access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, name="distillgate-gateway", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UpstreamError(f"the in-process gateway did not start on 127.0.0.1:{port}",
                                    hint="run with DISTILLGATE_DEBUG=1, or start `distillgate gateway serve` and "
                                    "pass --gateway URL")
            time.sleep(0.01)
        yield GatewayTarget(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret)
    finally:
        server.should_exit = True
        thread.join(30)
        with contextlib.suppress(Exception):
            keys.revoke(record.key_id)
        keys.close()
        gateway.store.close()
        gateway.keys.close()


