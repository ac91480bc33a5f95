"""Store backends: durable decisions per second on SQLite and on PostgreSQL, one process and two.

    python benchmarks/store_backends.py [--entries 3000] [--pg-url postgresql://...] [--out store_backends.json]

Without ``--pg-url`` a throw-away PostgreSQL cluster is started on loopback (Debian's binaries, as the tests do).
Every figure is ``Store.admit`` calls per second from W threads (group commit shares a commit between the callers
queued at once), each committed before it returns: SQLite with fsync (``synchronous=FULL``), PostgreSQL with its
defaults (``fsync=on``, ``synchronous_commit=on``). ``procs_2`` runs two processes of 16 threads each on one store,
as two replicas do. Prints a table and writes benchmarks/results/store_backends.json with the load average.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from distillgate.ledger import Store
from distillgate.policy import Request, policy_from_data

SEED = {
    "policy_id": "bench", "allowed_projects": ["p"], "allowed_outputs": ["labels"],
    "quotas": {"tokens_per_day": 10**12, "records_per_run": 10**9},
}
REQ = Request(user="alice", project="p", run="bench", output_type="labels", model="m", max_tokens=8,
              prompt_tokens=8)


def appends(db: str, total: int, writers: int) -> float:
    policy = policy_from_data(SEED)
    with Store.open(db) as store:
        per = max(1, total // writers)

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


def _proc(db: str, total: int, writers: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(appends(db, total, writers))


def two_processes(db: str, total: int) -> float:
    Store.open(db).close()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start = time.perf_counter()
    procs = [ctx.Process(target=_proc, args=(db, total // 2, 16, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start  # includes both processes' start-up: a lower bound
    for _ in procs:
        out.get()
    return (total // 2 // 16 * 16 * 2) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=3000)
    ap.add_argument("--pg-url", default=None, help="an empty PostgreSQL database (default: a throw-away cluster)")
    ap.add_argument("--out", default="store_backends.json", help="file name under benchmarks/results/ (or a path)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DISTILLGATE_SIGNING_KEY", str(Path(tmp) / "signing-key.pem"))
        if args.pg_url is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from _pg_support import PgServer

            server = PgServer()
            server.start()
        try:
            def pg() -> str:
                return args.pg_url if server is None else server.fresh_db()

            results: dict[str, float] = {}
            for name, fresh in (("sqlite", lambda: str(Path(tempfile.mkdtemp(dir=tmp)) / "s.db")), ("postgres", pg)):
                for w in (1, 16, 64):
                    n = args.entries // 3 if w == 1 else args.entries
                    results[f"{name}_appends_per_s_{w}_writers"] = appends(fresh(), n, w)
                results[f"{name}_appends_per_s_procs_2x16"] = two_processes(fresh(), args.entries)
        finally:
            if server is not None:
                server.close()
    results["pg_vs_sqlite_16_writers"] = results["postgres_appends_per_s_16_writers"] / \
        results["sqlite_appends_per_s_16_writers"]
    results["load_average_1m_before"] = load_before
    results["load_average_1m_after"] = os.getloadavg()[0]
    results["cpus"] = os.cpu_count() or 0
    print(f"{'measure':<40}{'value':>14}")
    for key, value in results.items():
        print(f"{key:<40}{value:>14,.2f}")
    out = Path(args.out) if os.sep in args.out else Path(__file__).parent / "results" / args.out
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
