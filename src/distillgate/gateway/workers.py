"""``gateway serve --workers N``: one supervisor, N worker processes, one listening socket.

The supervisor binds the socket once, then forks N workers before it starts any thread. Each worker builds its
own gateway (its own store connection and writer thread, its own extraction monitor sharing its windows through
the store: extraction/shared.py) and runs uvicorn on the inherited socket with the gateway's protocol class
(gateway/protocol.py); the kernel hands each new connection to one worker's ``accept``. A connection stays with
the worker that accepted it; which worker a request lands on does not matter: quotas are exact through the
store's locking, and the monitor's windows are merged through the store.

The supervisor restarts a worker that exits (after a short back-off when it keeps dying at start), and on SIGTERM
or SIGINT sends SIGTERM to every worker (each finishes its requests: uvicorn's graceful shutdown), waits up to
``grace_s``, then SIGKILLs what is left. A worker whose supervisor dies (even by SIGKILL) gets SIGTERM
(``PR_SET_PDEATHSIG``), so no orphan keeps serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from distillgate.gateway.config import GatewayConfig

_log = logging.getLogger("distillgate.gateway")
_PR_SET_PDEATHSIG = 1
GIVE_UP = 5  # a worker that dies this many times in a row within 5 s of its start stops the supervisor


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening socket every worker accepts on (IPv6 when ``host`` is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_worker(config: GatewayConfig, sock: socket.socket) -> None:
    """One worker: its own gateway on the shared socket, until uvicorn's signal handlers stop it."""
    import uvicorn

    from distillgate.gateway.protocol import gateway_protocol
    from distillgate.gateway.server import build_gateway, close_gateway, uvicorn_options

    gateway = build_gateway(config)
    try:
        server = uvicorn.Server(uvicorn.Config(gateway, **uvicorn_options(config),
                                               http=gateway_protocol(config.max_header_bytes)))
        server.run(sockets=[sock])
    finally:
        close_gateway(gateway)


def supervise(config: GatewayConfig, workers: int, *, grace_s: float = 30.0,
              worker: Callable[[GatewayConfig, socket.socket], None] = run_worker) -> int:
    """Run ``workers`` processes of ``worker`` on one socket until SIGTERM/SIGINT (exit status 0), or until a worker
    keeps dying at start (``GIVE_UP`` times in a row: 1)."""
    sock = bind(config.host, config.port)
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)
    deaths: dict[int, int] = {}  # slot -> quick deaths in a row (back-off)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _die_with_parent()
                os.environ["DISTILLGATE_WORKER"] = str(slot)
                worker(config, sock)
            except BaseException as exc:
                if not isinstance(exc, SystemExit | KeyboardInterrupt):
                    print(f"distillgate worker {slot} failed: {type(exc).__name__}: {exc}", file=sys.stderr,
                          flush=True)
                    code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = (slot, time.monotonic())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"distillgate gateway: {workers} workers on http://{config.host}:{config.port}/v1 "
          f"(supervisor pid {os.getpid()})", file=sys.stderr, flush=True)
    for slot in range(workers):
        spawn(slot)
    pending: list[tuple[float, int]] = []  # (restart at, slot)
    code = 0
    try:
        while not stopping and not code:
            reaped = _reap(children)
            for slot, started, status in reaped:
                quick = time.monotonic() - started < 5.0
                deaths[slot] = deaths.get(slot, 0) + 1 if quick else 0
                if deaths[slot] >= GIVE_UP:  # it cannot start (a bad store, a missing key): say so and stop
                    print(f"distillgate worker {slot} exited {deaths[slot]} times in a row at start "
                          f"({_describe(status)}); stopping", file=sys.stderr, flush=True)
                    code = 1
                    break
                delay = min(10.0, 0.5 * 2 ** (deaths[slot] - 1)) if quick else 0.0
                print(f"distillgate worker {slot} exited ({_describe(status)}); restarting in {delay:g} s",
                      file=sys.stderr, flush=True)
                pending.append((time.monotonic() + delay, slot))
            if code:
                break
            now = time.monotonic()
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                spawn(item[1])
            time.sleep(0.1)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while children and time.monotonic() < deadline:
            _reap(children)
            time.sleep(0.05)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        sock.close()
    return code


def _reap(children: dict[int, tuple[int, float]]) -> list[tuple[int, float, int]]:
    """The workers that exited since the last call: (slot, started at, wait status)."""
    out = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in children:
            slot, started = children.pop(pid)
            out.append((slot, started, status))
    return out


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.WEXITSTATUS(status)}"
