"""Gateway throughput with extraction embeddings on, against detection off (issue 24: "never silently blind").

    python benchmarks/extraction_throughput.py [--seconds 20] [--concurrency 16] [--modes off signals minilm]

Each mode starts ``distillgate gateway serve`` (own process, loopback) in front of the in-repo fake teacher:

* ``off``      the policy sets ``extraction.enabled: false`` (no signals, no embeddings)
* ``signals``  every signal but the embedding ones (``extraction.embedder: none``)
* ``minilm``   all-MiniLM-L6-v2 embeddings of each request's variable part (the project declares its 77-intent
               template and has a reference), with the default back-pressure (``embed_wait_s``)
* ``minilm-mp`` the same with ``extraction.process: true``

``--concurrency`` clients each send distinct real banking77 messages in the declared template, one request in
flight each, for ``--seconds``. Reports requests/s, p50/p99 latency, the embedder's backlog and the embeddings
dropped (each recorded unobserved in its decision entry), and the ratio to ``off``. Writes
benchmarks/results/extraction_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extraction_replay import ROOT, _metric, served_gateway
from extraction_traffic import DATA, TEMPLATES, _csv, declared_policy

PROJECT = "support-intents"


def policy(enabled: bool) -> dict[str, Any]:
    return {"policy_id": "throughput", "allowed_projects": [PROJECT], "allowed_outputs": ["labels", "logits"],
            "quotas": {"tokens_per_day": 10**13, "records_per_run": 10**9},
            "extraction": {"enabled": enabled, "approved": {PROJECT: declared_policy()[PROJECT]}}}


async def load(url: str, secret: str, prompts: list[str], seconds: float, concurrency: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def client(cid: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            while time.perf_counter() < stop:
                i = next(counter)
                t = time.perf_counter()
                r = await c.post("/v1/chat/completions", headers={
                    "Authorization": f"Bearer {secret}", "X-Policy-Project": PROJECT, "X-Policy-Run": f"r{cid}",
                    "X-Policy-Output-Type": "labels"},
                    json={"model": "fake-teacher", "max_tokens": 8,
                          "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
                latencies.append(time.perf_counter() - t)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"requests": len(latencies), "rps": round(len(latencies) / wall, 1), "statuses": statuses,
            "p50_ms": round(1e3 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1e3 * float(np.percentile(latencies, 99)), 1)}


def run_mode(mode: str, args: argparse.Namespace, work: Path, prompts: list[str], ref: list[str]) -> dict[str, Any]:
    import httpx

    from distillgate.keys import KeyStore

    db = work / f"{mode}.db"
    (work / f"{mode}-policy.json").write_text(json.dumps(policy(mode != "off")))
    keys = KeyStore(db)
    secret = keys.create("bench")[1]
    keys.close()
    refs = work / "approved.jsonl"
    refs.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ref))
    extraction: dict[str, Any] = {"embedder": "none"}
    if mode.startswith("minilm"):
        extraction = {"embedder": "minilm", "references": {PROJECT: str(refs)}, "process": mode == "minilm-mp"}
    config = {"db": str(db), "policy": str(work / f"{mode}-policy.json"), "extraction": extraction}
    with served_gateway(work, mode, config, ready_timeout=900) as (base_url, ready_s):
        out = asyncio.run(load(base_url, secret, prompts, args.seconds, args.concurrency))
        metrics = httpx.get(f"{base_url}/metrics").text
        out["embed_backlog_after"] = _metric(metrics, "distillgate_extraction_embed_backlog")
        out["embeddings_dropped"] = _metric(metrics, "distillgate_extraction_embeddings_dropped")
        out["ready_s"] = round(ready_s, 1)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["off", "signals", "minilm"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extraction_throughput.json"))
    args = ap.parse_args()
    texts = _csv(DATA / "banking77" / "test.csv", "text")
    prompts = [TEMPLATES["intent77-list"].replace("{input}", t) for t in texts]
    ref = [TEMPLATES["intent77-list"].replace("{input}", t) for t in _csv(DATA / "banking77" / "train.csv", "text")[::10]]
    results: dict[str, Any] = {"seconds": args.seconds, "concurrency": args.concurrency,
                               "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="extraction-throughput-") as tmp:
        for mode in args.modes:
            results[mode] = run_mode(mode, args, Path(tmp), prompts, ref)
            print(mode, results[mode], flush=True)
    if "off" in results:
        for mode in args.modes:
            results[mode]["ratio_to_off"] = round(results[mode]["rps"] / results["off"]["rps"], 3)
    results["load_average_after"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps({m: results[m].get("ratio_to_off") for m in args.modes}))


if __name__ == "__main__":
    main()
