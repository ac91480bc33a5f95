"""Gateway overhead benchmark (prints figures, asserts nothing).

In one run, on loopback, against the same fast upstream (the in-repo fake teacher, its own process):

  direct        the load generator talks to the fake teacher itself
  passthrough   a minimal Python pass-through proxy (raw ASGI app, uvicorn uvloop/httptools, and the gateway's
                own upstream client, distillgate.teachers.h1): the same HTTP stack as the gateway, nothing else.
                The ratios are taken against it.
  passthrough-aiohttp  the same with a pooled aiohttp client (what most Python proxies use)
  passthrough-h11  the same on uvicorn's pure-Python stack (asyncio loop + h11)
  floor         the pass-through plus only what a durable, stamped decision must cost, written plainly: JSON parse,
                SHA-256 of request and answer, one hash-chained row group-committed to SQLite with fsync before the
                answer, an Ed25519-signed stamp. No policy, quotas, screens or extraction monitor: how close any
                gateway bound by the same rules could come to the pass-through
  distillgate   the full gateway: API key check, screens, decide() + quota reservation + decision-log entry
                (fsync, synchronous=FULL) before forwarding, settlement (fsync) after, signed stamp
  distillgate-after  the same with ``settle: after_reply`` (the decision is durable before the answer; the
                settlement commits while the answer travels)
  distillgate-h11  the same gateway on uvicorn's pure-Python stack (asyncio loop + h11): the alternative to
                uvloop/httptools
  workers-{sqlite,pg}-{1,2}[-unshared]  ``gateway serve --workers N`` (N = 1, 2) on SQLite or PostgreSQL (a throw-away cluster
                unless ``--pg-url``), the extraction monitor's windows shared through the store; CPU per request
                counts the supervisor and every worker; ``-unshared`` turns the sharing off (its cost). Not in the
                default ``--only``
  litellm       LiteLLM's proxy (``litellm[proxy]`` from PyPI, installed by this script into its own venv under
                ``.cache/litellm-venv``), a plain pass-through to the same fake teacher with a master key, one worker

For each: throughput (requests/s) at concurrency 1/16/64, p50/p99 latency and the CPU time the proxy's process
(every thread, and its child processes) spent per request, in microseconds, read from /proc around each load: on a
shared machine throughput drifts with what else runs, the CPU a request costs much less. Then ratios against
passthrough and the floor, and the p50 latency each proxy adds over direct at concurrency 1.

    python benchmarks/gateway.py [--seconds 4] [--concurrency 1 16 64] [--only direct distillgate litellm]

Writes benchmarks/results/gateway.json, or ``--out PATH`` (every figure, the ratios, and the load average during the run).

The load generator is a raw keep-alive HTTP/1.1 client on uvloop in its own process. Everything shares this
machine's cores, so absolute numbers depend on the host; ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
TESTS = ROOT / "tests"

POLICY = {
    "policy_id": "bench", "allowed_projects": ["bench"], "allowed_outputs": ["labels"],
    "blocked_outputs": ["third_party_model_extraction", "credentialed_api_replication"],
    "quotas": {"tokens_per_day": 10**12, "records_per_run": 10**12},
}

# What the pass-through and the floor share: reading the ASGI body, sending a JSON answer, and the upstream clients
# ("h1" is the gateway's own, distillgate.teachers.h1; "aiohttp" the library most Python proxies would reach for),
# each `async def forward(path, body) -> (status, bytes)`.
CLIENTS = r'''
async def read_body(receive):
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            return body
async def send_json(send, status, content):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})
import aiohttp
from distillgate.teachers.h1 import HttpPool
def make_forward(kind, upstream):
    if kind == "h1":
        pool = HttpPool(upstream, {"content-type": "application/json"})
        async def forward(path, body):
            r = await pool.request("POST", path, body)
            return r.status, await r.read()
        return forward
    session = None
    async def forward(path, body):
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        async with session.post(upstream + path, data=body, headers={"content-type": "application/json"}) as r:
            return r.status, await r.read()
    return forward
'''

PASSTHROUGH = CLIENTS + r'''
import sys, uvicorn
upstream, port, loop, http, client = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
forward = make_forward(client, upstream)
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    status, content = await forward(scope["path"].removeprefix("/v1"), await read_body(receive))
    await send_json(send, status, content)
uvicorn.run(app, host="127.0.0.1", port=port, loop=loop, http=http, access_log=False, log_level="warning",
            proxy_headers=False)
'''

FLOOR = CLIENTS + r'''
# The floor: the pass-through plus only what every decision must cost under the issue's rules, written as plainly as
# possible -- no policy, quotas, screens or extraction monitor. Per request: parse the JSON body, SHA-256 of the
# request, one hash-chained row appended to SQLite (WAL, synchronous=FULL) by a writer thread that group-commits and
# fsyncs, awaited before the answer; the upstream call; SHA-256 of the answer and an Ed25519-signed stamp added to it.
import asyncio, hashlib, sqlite3, sys, threading, time, orjson, uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
upstream, port, db = sys.argv[1], int(sys.argv[2]), sys.argv[3]
key = Ed25519PrivateKey.generate()
forward = make_forward("h1", upstream)
jobs, wake = [], threading.Condition()
def writer():
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL"); conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, body BLOB, hash TEXT)")
    head, idx = "0" * 64, 0
    while True:
        with wake:
            while not jobs:
                wake.wait()
            batch = jobs[:]; jobs.clear()
        conn.execute("BEGIN")
        rows = []
        for body, fut, loop in batch:
            idx += 1
            head = hashlib.sha256(head.encode() + body).hexdigest()
            rows.append((idx, body, head))
        conn.executemany("INSERT INTO log VALUES (?, ?, ?)", rows)
        conn.execute("COMMIT")
        for (_, fut, loop), (i, _, h) in zip(batch, rows):
            loop.call_soon_threadsafe(fut.set_result, (i, h))
threading.Thread(target=writer, daemon=True).start()
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    req = orjson.loads(body)
    request_hash = hashlib.sha256(body).hexdigest()
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    entry = orjson.dumps({"model": req.get("model"), "request_hash": request_hash, "decision": "allow", "ts": time.time()})
    with wake:
        jobs.append((entry, fut, loop)); wake.notify()
    status, content = await forward(scope["path"].removeprefix("/v1"), body)
    index, entry_hash = await fut  # durable before the answer
    resp = orjson.loads(content)
    stamp = orjson.dumps({"entry": index, "entry_hash": entry_hash, "request_hash": request_hash,
                          "response_hash": hashlib.sha256(content).hexdigest(), "time": time.time()},
                         option=orjson.OPT_SORT_KEYS)
    resp["distillgate"] = {"stamp": stamp.decode(), "sig": key.sign(stamp).hex()}
    await send_json(send, status, orjson.dumps(resp))
uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False,
            log_level="warning", proxy_headers=False)
'''

GATEWAY = r'''
import sys, uvicorn
from distillgate.gateway.config import config_from_data
from distillgate.gateway.server import build_gateway
policy, db, upstream, port, loop, http, settle, process = sys.argv[1:9]
gw = build_gateway(config_from_data({"policy": policy, "db": db, "upstreams": {"fake": {"base_url": upstream}},
                                     "settle": settle, "extraction": {"process": process == "process"}}))
uvicorn.run(gw, host="127.0.0.1", port=int(port), loop=loop, http=http, access_log=False, log_level="warning",
            lifespan="on", backlog=2048, proxy_headers=False)
'''

WORKERS = r'''
import sys
from distillgate.gateway.config import config_from_data
from distillgate.gateway.server import serve
policy, db, upstream, port, workers, shared = sys.argv[1:7]
serve(config_from_data({"policy": policy, "db": db, "upstreams": {"fake": {"base_url": upstream}}, "port": int(port),
                        "access_log": False, "workers": int(workers), "extraction": {"shared": shared == "shared"}}))
'''
# ``-unshared``: the same with ``extraction.shared: false`` (what sharing the monitor's windows costs)
WORKER_TARGETS = tuple(f"workers-{b}-{n}{u}" for u in ("", "-unshared") for b in ("sqlite", "pg") for n in (1, 2))

FAKE = r'''
import sys
sys.path.insert(0, sys.argv[2])
from fakes.fake_upstream import main
main(["--port", sys.argv[1]])
'''

LOADGEN = r'''
import asyncio, json, sys, time, uvloop
host, port, conc, seconds, req = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5].encode("latin-1")

async def worker(lat, stop_at):
    reader, writer = await asyncio.open_connection(host, port)
    errors = 0
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            errors += 1
        lat.append(time.perf_counter() - t0)
    writer.close()
    return errors

async def main():
    # warm-up
    warm = []
    await asyncio.gather(*[worker(warm, time.perf_counter() + 0.5) for _ in range(conc)])
    lat = []
    t0 = time.perf_counter()
    errors = sum(await asyncio.gather(*[worker(lat, t0 + seconds) for _ in range(conc)]))
    elapsed = time.perf_counter() - t0
    lat.sort()
    print(json.dumps({"n": len(lat), "n_warm": len(warm), "rps": len(lat) / elapsed, "p50": lat[len(lat) // 2],
                      "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "errors": errors}))

uvloop.run(main())
'''


LITELLM_VENV = ROOT / ".cache" / "litellm-venv"
LITELLM_KEY = "sk-bench-master-key"
RESULTS = ROOT / "benchmarks" / "results" / "gateway.json"


def litellm_binary(venv: Path) -> Path:
    """The litellm CLI in its own venv (created and filled from PyPI on first use: it is not our dependency)."""
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"installing litellm[proxy] into {venv} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def start_litellm(venv: Path, upstream: str, port: int, tmp: Path) -> subprocess.Popen[bytes]:
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake-teacher\n"
        "    litellm_params:\n"
        "      model: openai/fake-teacher\n"
        f"      api_base: {upstream}\n"
        "      api_key: not-needed\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
    env.pop("PYTHONPATH", None)
    log = (tmp / "litellm.log").open("wb")
    return subprocess.Popen([str(litellm_binary(venv)), "--config", str(config), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", "1"], env=env, stdout=log, stderr=log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def start(code: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def request_bytes(path: str, key: str) -> str:
    body = json.dumps({"model": "fake-teacher", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "my card was lost, what should I do?"}]})
    headers = {"host": "bench", "content-type": "application/json", "content-length": str(len(body)),
               "authorization": f"Bearer {key}", "x-policy-user": "bench", "x-policy-project": "bench",
               "x-policy-run": "run", "x-policy-output-type": "labels"}
    return f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n" + body


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (every thread) and of its live child processes (the extraction
    monitor's process of distillgate-mp), from /proc; 0.0 where /proc cannot be read."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def load(port: int, conc: int, seconds: float, req: str, pid: int | None = None) -> dict[str, float]:
    """One measurement; with ``pid``, also the CPU time that process spent per request (warm-up included in
    both), in microseconds: what a request costs the proxy, whatever else the machine is running."""
    before = cpu_seconds(pid) if pid is not None else 0.0
    out = subprocess.run([sys.executable, "-c", LOADGEN, "127.0.0.1", str(port), str(conc), str(seconds), req],
                         capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout)
    if pid is not None and before:
        result["cpu_us_per_request"] = (cpu_seconds(pid) - before) / (result["n"] + result["n_warm"]) * 1e6
    return result


def sqlite_commit_latency(tmp: Path, n: int = 300) -> float:
    """p50 of one bare SQLite commit (WAL, synchronous=FULL, one small row) in the same directory: the fsync every
    durable write pays, whatever code surrounds it."""
    import sqlite3

    conn = sqlite3.connect(tmp / "bare-commit.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (x INTEGER)")
        times = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            conn.execute("COMMIT")
            if i >= 20:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        conn.close()


def store_latency(tmp: Path, n: int = 200) -> dict[str, float]:
    """p50 of the durable log calls alone (no HTTP), to attribute the gateway's added latency, beside a bare SQLite
    commit's: a request at concurrency 1 pays two durable writes (the decision before forwarding, the settlement
    before the answer), the floor one."""
    import uvloop

    from distillgate.ledger.store import Store
    from distillgate.policy import PolicySet, Request, policy_from_data

    policies = PolicySet([policy_from_data(POLICY)])
    store = Store.open(tmp / "store-only.db")
    req = Request(user="bench", project="bench", run="run", output_type="labels", max_tokens=16)

    async def go() -> dict[str, float]:
        admit: list[float] = []
        settle: list[float] = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            adm = await store.aadmit(policies, req, request_hash="0" * 64)
            t1 = time.perf_counter()
            assert adm.reservation_id is not None
            await store.asettle(adm.reservation_id, prompt_tokens=10, completion_tokens=10, records=1)
            if i >= 20:
                admit.append(t1 - t0)
                settle.append(time.perf_counter() - t1)
        return {"aadmit_p50": statistics.median(admit), "asettle_p50": statistics.median(settle)}

    try:
        return {**uvloop.run(go()), "sqlite_commit_p50": sqlite_commit_latency(tmp)}
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure every point this many times, rounds interleaved across targets; report the median "
                         "(by throughput) -- shared machines drift by tens of percent from minute to minute")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--only", nargs="+", default=["direct", "passthrough", "passthrough-aiohttp", "passthrough-h11",
                                                  "floor", "distillgate", "distillgate-after", "distillgate-mp",
                                                  "distillgate-h11", "litellm"])
    ap.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV)
    ap.add_argument("--pg-url", default=None, help="an empty PostgreSQL database for workers-pg-N (default: a "
                    "throw-away cluster, one database per target)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the results JSON goes")
    args = ap.parse_args()
    sys.path.insert(0, str(SRC))
    from distillgate.keys import KeyStore

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="dg-bench-"))
    (tmp / "policy.json").write_text(json.dumps(POLICY))
    procs: list[subprocess.Popen[bytes]] = []
    pg_server: Any = None
    try:
        fake_port = free_port()
        procs.append(start(FAKE, str(fake_port), str(TESTS)))
        wait_port(fake_port, procs[-1])
        upstream = f"http://127.0.0.1:{fake_port}/v1"
        targets: dict[str, int] = {"direct": fake_port}
        pids: dict[str, int] = {"direct": procs[-1].pid}
        for name, loop, http, client in PASSTHROUGHS:
            if name in args.only:
                port = free_port()
                procs.append(start(PASSTHROUGH, upstream, str(port), loop, http, client))
                wait_port(port, procs[-1])
                targets[name] = port
                pids[name] = procs[-1].pid
        if "floor" in args.only:
            port = free_port()
            procs.append(start(FLOOR, upstream, str(port), str(tmp / "floor.db")))
            wait_port(port, procs[-1])
            targets["floor"] = port
            pids["floor"] = procs[-1].pid
        for name, loop, http, settle, monitor in GATEWAYS:
            if name in args.only:
                port = free_port()
                procs.append(start(GATEWAY, str(tmp / "policy.json"), str(tmp / f"{name}.db"), upstream, str(port),
                                   loop, http, settle, monitor))
                wait_port(port, procs[-1])
                targets[name] = port
                pids[name] = procs[-1].pid
        for name in WORKER_TARGETS:
            if name not in args.only:
                continue
            if "-pg-" in name:
                if args.pg_url is None and pg_server is None:
                    sys.path.insert(0, str(TESTS))
                    from _pg_support import PgServer

                    pg_server = PgServer()
                    pg_server.start()
                os.environ.setdefault("DISTILLGATE_SIGNING_KEY", str(tmp / "pg-signing-key.pem"))
                db = args.pg_url if pg_server is None else str(pg_server.fresh_db())
            else:
                db = str(tmp / f"{name}.db")
            port = free_port()
            ks = KeyStore(db)  # before the workers start: the store exists, and the key with it
            KEYS[name] = ks.create("bench")[1]
            ks.close()
            workers = name.split("-")[2]
            shared = "unshared" if name.endswith("-unshared") else "shared"
            procs.append(start(WORKERS, str(tmp / "policy.json"), db, upstream, str(port), workers, shared))
            wait_port(port, procs[-1], timeout=120)
            time.sleep(2.0)  # every worker up (the port opens with the socket, before the workers build)
            targets[name] = port
            pids[name] = procs[-1].pid
        if "litellm" in args.only:
            port = free_port()
            procs.append(start_litellm(args.litellm_venv, upstream, port, tmp))
            wait_port(port, procs[-1], timeout=300)  # litellm imports for a long time
            targets["litellm"] = port
            pids["litellm"] = procs[-1].pid
            KEYS["litellm"] = LITELLM_KEY
        for name, *_ in GATEWAYS:  # each gateway has its own store: give it a key
            if name in targets:
                ks = KeyStore(tmp / f"{name}.db")
                KEYS[name] = ks.create("bench")[1]
                ks.close()
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.repeat):
            for name, port in targets.items():
                if name not in args.only:
                    continue
                for conc in args.concurrency:
                    req = request_bytes("/v1/chat/completions", KEYS.get(name, "not-needed"))
                    r = load(port, conc, args.seconds, req, pids.get(name))
                    runs.setdefault((name, conc), []).append(r)
                    print(f"  measured {name:16s} c={conc:<3d} {r['rps']:8.0f} req/s  p50 {r['p50'] * 1e3:6.2f} ms  "
                          f"p99 {r['p99'] * 1e3:6.2f} ms  cpu {r.get('cpu_us_per_request', 0):6.0f} us/req  "
                          f"errors {int(r['errors'])}", file=sys.stderr, flush=True)
        results: dict[tuple[str, int], dict[str, Any]] = {}
        for point, rs in runs.items():
            ranked = sorted(rs, key=lambda r: r["rps"])
            results[point] = {**ranked[len(ranked) // 2], "rps_runs": [round(r["rps"], 1) for r in rs]}
            cpu = [r["cpu_us_per_request"] for r in rs if "cpu_us_per_request" in r]
            if cpu:  # the median of its own runs (the run of median throughput need not have the median cost)
                results[point].update(cpu_us_per_request=statistics.median(cpu),
                                      cpu_us_runs=[round(c, 1) for c in cpu])
        print_table(results, args.concurrency)
        lat = store_latency(tmp)
        print(f"\ndurable log alone (in-process, sequential): aadmit p50 {lat['aadmit_p50'] * 1e3:.2f} ms, "
              f"asettle p50 {lat['asettle_p50'] * 1e3:.2f} ms; a bare SQLite commit (WAL, synchronous=FULL) p50 "
              f"{lat['sqlite_commit_p50'] * 1e3:.2f} ms")
        write_json(results, args, lat, load_before)
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(40)
            except subprocess.TimeoutExpired:
                p.kill()
        if pg_server is not None:
            pg_server.close()


KEYS: dict[str, str] = {}
PASSTHROUGHS = (("passthrough", "uvloop", "httptools", "h1"),
                ("passthrough-aiohttp", "uvloop", "httptools", "aiohttp"),
                ("passthrough-h11", "asyncio", "h11", "h1"))
GATEWAYS = (("distillgate", "uvloop", "httptools", "before_reply", "inline"),
            ("distillgate-after", "uvloop", "httptools", "after_reply", "inline"),
            ("distillgate-mp", "uvloop", "httptools", "before_reply", "process"),
            ("distillgate-h11", "asyncio", "h11", "before_reply", "inline"))


def ratios(results: dict[tuple[str, int], dict[str, Any]], concurrency: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for conc in concurrency:
        for name, bases in (("distillgate", ("passthrough", "floor", "litellm")), ("floor", ("passthrough", "litellm"))):
            mine = results.get((name, conc))
            for base in bases:
                other = results.get((base, conc))
                if mine and other and other["rps"]:
                    out[f"{name}_over_{base}_c{conc}"] = mine["rps"] / other["rps"]
        mine, floor = results.get(("distillgate", conc)), results.get(("floor", conc))
        if mine and floor and mine.get("cpu_us_per_request") and floor.get("cpu_us_per_request"):
            out[f"distillgate_cpu_over_floor_cpu_c{conc}"] = mine["cpu_us_per_request"] / floor["cpu_us_per_request"]
        for backend in ("sqlite", "pg"):
            one, two = results.get((f"workers-{backend}-1", conc)), results.get((f"workers-{backend}-2", conc))
            if one and two and one["rps"]:
                out[f"workers_{backend}_2_over_1_c{conc}"] = two["rps"] / one["rps"]
    direct, mine = results.get(("direct", 1)), results.get(("distillgate", 1))
    if direct and mine:
        out["distillgate_added_p50_ms_c1"] = (mine["p50"] - direct["p50"]) * 1e3
    return out


def write_json(results: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace,
               lat: dict[str, float], load_before: float) -> None:
    doc = {
        "seconds_per_point": args.seconds,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
        "points": [{"target": n, "concurrency": c, **r} for (n, c), r in results.items()],
        "ratios": ratios(results, args.concurrency),
        "durable_log_alone": lat,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    for key, value in doc["ratios"].items():
        print(f"  {key:36s} {value:8.2f}{' ms' if key.endswith('_ms_c1') else 'x'}")
    print(f"wrote {args.out}")


def print_table(results: dict[tuple[str, int], dict[str, Any]], concurrency: list[int]) -> None:
    names = list(dict.fromkeys(n for n, _ in results))
    print(f"\n{'target':18s} {'conc':>4s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'vs passthrough':>15s} "
          f"{'cpu us/req':>10s} {'errors':>6s}")
    for name in names:
        for conc in concurrency:
            r = results.get((name, conc))
            if r is None:
                continue
            base = results.get(("passthrough", conc))
            ratio = f"{r['rps'] / base['rps']:.2f}x" if base else "-"
            cpu = f"{r['cpu_us_per_request']:.0f}" if "cpu_us_per_request" in r else "-"
            print(f"{name:18s} {conc:4d} {r['rps']:9.0f} {r['p50'] * 1e3:8.2f} {r['p99'] * 1e3:8.2f} {ratio:>15s} "
                  f"{cpu:>10s} {int(r['errors']):6d}")
    direct = results.get(("direct", 1))
    if direct:
        print("\nadded p50 latency at concurrency 1 (vs direct):")
        for name in names:
            r = results.get((name, 1))
            if r and name != "direct":
                print(f"  {name:18s} +{(r['p50'] - direct['p50']) * 1e3:.2f} ms")
    med = [results[(n, c)]["rps"] for n, c in results if n == "distillgate"]
    if med:
        print(f"\ndistillgate median throughput over concurrencies: {statistics.median(med):.0f} req/s")


if __name__ == "__main__":
    main()
