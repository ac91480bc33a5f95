"""Foundation benchmark: decide() throughput, durable decision-log appends, verify time.

    python benchmarks/foundation.py [--entries 20000] [--verify-entries 100000] [--out foundation.json]
    python benchmarks/foundation.py --verify-entries 1000000 --out foundation_1m.json   # the 1M-entry verify

Prints a table and writes benchmarks/results/foundation.json (or --out), with the load average of the run. Every append is committed with fsync
(SQLite WAL, synchronous=FULL) before the caller returns.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from distillgate.ledger import Store
from distillgate.ledger.store import _Job
from distillgate.ledger.verify import verify_db
from distillgate.policy import Request, Usage, decide, policy_from_data

SEED = {
    "policy_id": "ml-research-distillation",
    "allowed_projects": ["internal-compression", "refusal-evals"],
    "allowed_outputs": ["labels", "rubrics", "summaries", "synthetic_records"],
    "blocked_outputs": ["third_party_model_extraction", "credentialed_api_replication"],
    "quotas": {"tokens_per_day": 10**12, "records_per_run": 10**9},
    "audit": {"reason_codes": True, "export": "s3://ai-governance/distillation/"},
}
REQ = Request(user="alice", project="internal-compression", run="bench", output_type="labels",
              model="local/smollm2-135m-instruct", max_tokens=64, prompt_tokens=40)


def bench_decide(n: int) -> float:
    policy = policy_from_data(SEED)
    usage = Usage(tokens_today_project=1000)
    start = time.perf_counter()
    for _ in range(n):
        decide(policy, REQ, usage)
    return n / (time.perf_counter() - start)


def bench_appends(db: Path, total: int, writers: int) -> float:
    policy = policy_from_data(SEED)
    with Store.open(db) as store:
        per = total // writers

        def work() -> None:
            for _ in range(per):
                store.admit(policy, REQ)

        threads = [threading.Thread(target=work) for _ in range(writers)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return per * writers / (time.perf_counter() - start)


def fill_fast(db: Path, total: int) -> None:
    policy = policy_from_data(SEED)
    with Store.open(db, batch_max=4096) as store:
        futures: list[Future[Any]] = []
        for _ in range(total):  # queue everything at once: the writer commits up to batch_max per transaction
            futures.append(Future())
            store._submit(_Job(store._admit_job(policy, REQ, None, None, None, None), futures[-1]))
        for f in futures:
            f.result()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=200_000)
    ap.add_argument("--entries", type=int, default=3000)
    ap.add_argument("--verify-entries", type=int, default=100_000)
    ap.add_argument("--out", default="foundation.json", help="file name under benchmarks/results/")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, float] = {
            "decide_per_s": bench_decide(args.decisions),
            "appends_per_s_1_writer": bench_appends(Path(tmp) / "a.db", args.entries // 3, 1),
            "appends_per_s_16_writers": bench_appends(Path(tmp) / "b.db", args.entries, 16),
            "appends_per_s_64_writers": bench_appends(Path(tmp) / "c.db", args.entries, 64),
        }
        db = Path(tmp) / "v.db"
        start = time.perf_counter()
        fill_fast(db, args.verify_entries)
        results["fill_s"] = time.perf_counter() - start
        start = time.perf_counter()
        report = verify_db(db)
        elapsed = time.perf_counter() - start
        assert report.ok
        results["verify_entries"] = args.verify_entries
        results["verify_s"] = elapsed
        results["verify_s_per_1M_extrapolated"] = elapsed * 1_000_000 / args.verify_entries
    results["group_commit_speedup_16"] = results["appends_per_s_16_writers"] / results["appends_per_s_1_writer"]
    results["load_average_1m_before"] = load_before
    results["load_average_1m_after"] = os.getloadavg()[0]
    results["cpus"] = os.cpu_count() or 0
    print(f"{'measure':<34}{'value':>14}")
    for key, value in results.items():
        print(f"{key:<34}{value:>14,.1f}")
    out = Path(__file__).parent / "results" / args.out
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
