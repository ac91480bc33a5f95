"""Review page latency on banking77: a working copy of N real utterances (teacher answers = the published label, a
second disagreeing sample on every 10th input), served by a real uvicorn server; a signed-in reviewer loads the
overview, takes rows from a queue and accepts them. Prints median / p95 per page and writes
benchmarks/results/web_review.json.

    python benchmarks/web_review.py [N ...]      (default: 1000 5000)
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from distillgate.data.config import IngestConfig  # noqa: E402
from distillgate.data.ingest import ingest_file  # noqa: E402
from distillgate.data.pipeline import build  # noqa: E402
from distillgate.data.store import GeneratedSample, WorkingCopy  # noqa: E402
from distillgate.keys import KeyStore  # noqa: E402
from distillgate.policy.model import PolicySet, policy_from_data  # noqa: E402
from distillgate.web import ReviewSite, create_app  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "web_review.json"
POLICY = {"policy_id": "bench", "allowed_projects": ["bank"], "allowed_outputs": ["labels"],
          "review": {"reviewers": {"bank": ["alice"]}}}


def make_dataset(tmp: Path, n: int) -> Path:
    with (ROOT / "data" / "banking77" / "train.csv").open(newline="") as fh:
        records = list(csv.DictReader(fh))[:n]
    traffic = tmp / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"id": str(i), "text": r["text"],
                                           "answer": json.dumps({"type": r["category"]})}) + "\n"
                               for i, r in enumerate(records)))
    cfg: dict[str, Any] = {"name": "banking77", "ingest": {"columns": {"input": "text", "record_id": "id",
                                                                       "output": "answer"}},
                           "filters": {"allowed_labels_file": str(ROOT / "data" / "banking77" / "categories.json")}}
    wc = WorkingCopy.create(tmp / "ds", cfg)
    wc.add_inputs(ingest_file(traffic, IngestConfig.model_validate(cfg["ingest"])).rows)
    wc.append_generated(
        GeneratedSample(f"traffic-{i}", 1, json.dumps({"type": "card_arrival"}), "bench", {}, "p", "0" * 64, {}, {})
        for i in range(0, n, 10))
    build(wc)
    wc.close()
    return tmp / "ds"


def timed(client: httpx.Client, method: str, url: str, **kw: Any) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    reply = client.request(method, url, **kw)
    return (time.perf_counter() - start) * 1000, reply


def run(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        dataset = make_dataset(tmp, n)
        built_s = time.perf_counter() - t0
        keys = KeyStore(tmp / "db.sqlite")
        secret = keys.create("alice")[1]
        keys.close()
        site = ReviewSite(dataset=dataset, db=tmp / "db.sqlite", policies=PolicySet([policy_from_data(POLICY)]),
                          project="bank")
        server = uvicorn.Server(uvicorn.Config(create_app(site), port=0, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        times: dict[str, list[float]] = {"overview": [], "next+row": [], "accept+next+row": []}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
            assert token
            c.post("/login", data={"csrf": token.group(1), "api_key": secret})
            for _ in range(5):
                ms, _r = timed(c, "GET", "/")
                times["overview"].append(ms)
            for _ in range(10):
                ms, reply = timed(c, "GET", "/queues/disagreement/next", follow_redirects=True)
                times["next+row"].append(ms)
                csrf = re.search(r'name="csrf" value="([^"]+)"', reply.text)
                version = re.search(r'name="row_version" value="(\d+)"', reply.text)
                assert csrf and version, reply.text[:500]
                action = str(reply.url.path) + "/accept"
                ms, _r = timed(c, "POST", action, data={"csrf": csrf.group(1), "row_version": version.group(1),
                                                        "queue": "disagreement"}, follow_redirects=True)
                times["accept+next+row"].append(ms)
        server.should_exit = True
        thread.join(20)
    out: dict[str, Any] = {"rows": n + len(range(0, n, 10)), "inputs": n, "build_s": round(built_s, 2)}
    for name, values in times.items():
        values.sort()
        out[name] = {"median_ms": round(statistics.median(values), 1),
                     "p95_ms": round(values[min(len(values) - 1, int(0.95 * len(values)))], 1)}
    return out


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1000, 5000]
    results = [run(n) for n in sizes]
    print(f"{'rows':>7} {'overview':>18} {'next+row':>18} {'accept+next+row':>18}   (median / p95 ms)")
    for r in results:
        cells = [f"{r[k]['median_ms']:>8} / {r[k]['p95_ms']:<7}" for k in ("overview", "next+row", "accept+next+row")]
        print(f"{r['rows']:>7} " + " ".join(cells))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
