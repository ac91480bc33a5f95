"""Instructions per gateway request, counted by valgrind's callgrind: a figure the machine's load does not move.

On a shared machine, throughput and even CPU time per request drift by tens of percent with what else runs (caches,
SMT siblings, frequency). The number of instructions a request executes does not. This benchmark drives the
gateway's ASGI app in-process (no HTTP server in front: uvicorn's own cost is the same for every version) against
the fake teacher in its own process, `concurrency` requests at a time, exactly as benchmarks/gateway.py sends them
(same policy, same body, a real API key, the durable SQLite log, the extraction monitor inline), and counts the
instructions of the measured requests only (instrumentation is switched on after a warm-up and off after them),
per thread: the event loop's thread, and the others (the ledger's writer thread above all).

    python benchmarks/gateway_cpu.py [--requests 200] [--concurrency 16] [--src PATH] [--label NAME]

``--src`` measures another checkout's sources (e.g. the previous release) with this driver, for an A/B on the same
figure; the result is added to benchmarks/results/gateway_cpu.json under ``--label``. Needs valgrind (Debian's
package); a run of 200 requests takes about a minute. Under valgrind the threads run one at a time, so the writer's
group commits hold fewer jobs than in a real run (more commits, hence more signed heads, per request): compare
versions with this figure, not with the throughput benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gateway_cpu.json"

CHILD = r'''
import asyncio, json, os, signal, subprocess, sys, tempfile
from pathlib import Path
bench, src, n, conc, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, bench)
sys.path.insert(0, src)
import gateway as B
import uvloop
from distillgate.gateway.config import config_from_data
from distillgate.gateway.server import build_gateway
try:
    from distillgate.keys import KeyStore
except ImportError:  # releases before keys moved out of the gateway
    from distillgate.gateway.keys import KeyStore

tmp = Path(tempfile.mkdtemp(prefix="dg-cpu-"))
(tmp / "policy.json").write_text(json.dumps(B.POLICY))
port = B.free_port()
fake = subprocess.Popen([sys.executable, "-c", B.FAKE, str(port), str(Path(bench).parent / "tests")],
                        env={**os.environ, "PYTHONPATH": src}, stdout=subprocess.DEVNULL)
B.wait_port(port, fake)
gw = build_gateway(config_from_data({"policy": str(tmp / "policy.json"), "db": str(tmp / "gw.db"),
                                     "upstreams": {"fake": {"base_url": f"http://127.0.0.1:{port}/v1"}}}))
ks = KeyStore(tmp / "gw.db")
key = ks.create("bench")[1]
ks.close()
head, body = B.request_bytes("/v1/chat/completions", key).split("\r\n\r\n", 1)
headers = [(k.lower().encode(), v.encode()) for k, v in (line.split(": ", 1) for line in head.split("\r\n")[1:])]
statuses = {}

async def one():
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent = False
    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body.encode(), "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
    async def send(message):
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1
    await gw(scope, receive, send)

async def requests(count):
    todo = iter(range(count))
    async def worker():
        for _ in todo:
            await one()
    await asyncio.gather(*[worker() for _ in range(conc)])

def instrument(on):
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], capture_output=True)

async def main():
    inbox, outbox = asyncio.Queue(), asyncio.Queue()
    life = asyncio.create_task(gw({"type": "lifespan"}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    await outbox.get()
    await requests(warm)
    instrument(True)
    await requests(n)
    instrument(False)
    await inbox.put({"type": "lifespan.shutdown"})
    await outbox.get()
    await life

uvloop.run(main())
gw.store.close()
fake.send_signal(signal.SIGINT)
try:
    fake.wait(10)
except subprocess.TimeoutExpired:  # a loaded machine: the measured requests are done, only the teardown is slow
    fake.kill()
    fake.wait()
print(json.dumps({"statuses": statuses}))
'''


def totals(path: Path) -> int:
    """The instruction count (Ir) of one callgrind output file."""
    out = subprocess.run(["callgrind_annotate", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^\s*([\d,]+) \([\s\d.]+%\)\s+PROGRAM TOTALS", out, re.M)
    return int(m.group(1).replace(",", "")) if m else 0


def measure(src: Path, n: int, conc: int, warm: int) -> dict[str, Any]:
    out_dir = Path(tempfile.mkdtemp(prefix="dg-callgrind-"))
    try:
        started = time.monotonic()
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes", "--instr-atstart=no",
             f"--callgrind-out-file={out_dir / 'cg'}", sys.executable, "-c", CHILD, str(ROOT / "benchmarks"),
             str(src), str(n), str(conc), str(warm)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src)})
        if proc.returncode != 0:
            raise RuntimeError(f"the measured run failed:\n{proc.stderr[-3000:]}")
        statuses = json.loads(proc.stdout.strip().splitlines()[-1])["statuses"]
        threads = sorted(out_dir.glob("cg-*"))
        counts = [totals(f) for f in threads]
        main, others = (counts[0], sum(counts[1:])) if counts else (0, 0)
        return {"src": str(src), "requests": n, "concurrency": conc, "statuses": statuses,
                "instructions_per_request": (main + others) / n, "event_loop_thread_per_request": main / n,
                "other_threads_per_request": others / n, "wall_s": round(time.monotonic() - started, 1)}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warm-up", type=int, default=100)
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the distillgate sources to measure")
    ap.add_argument("--label", default="this checkout")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    r = measure(args.src.resolve(), args.requests, args.concurrency, args.warm_up)
    print(f"{args.label}: {r['instructions_per_request'] / 1e3:,.0f} k instructions per request "
          f"(event loop {r['event_loop_thread_per_request'] / 1e3:,.0f} k, other threads "
          f"{r['other_threads_per_request'] / 1e3:,.0f} k), {args.requests} requests at c={args.concurrency}, "
          f"answers {r['statuses']}")
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc[args.label] = r
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
