"""The extraction detector on realistic, declared research traffic with co-tenant, slow, wide and mimic attackers
(issue 24), using the independent generator in ``benchmarks/extraction_traffic.py``.

    python benchmarks/extraction_realistic.py [--embedder minilm|hashing] [--users 12] [--attackers 6]
                                              [--scale 1.0] [--seed 24] [--cache FILE.npz]

Every request goes through ``ExtractionMonitor.observe`` under a policy that declares each project's research
shapes (``extraction.approved``) and gives each project a reference of disjoint approved text; the embedder's
worker is drained every 16 requests (a gateway whose embedder keeps up, as back-pressure guarantees). Each request
is also judged by ``decide()`` under the same policy with every signal's action set to ``deny``: the "denied in
deny mode" figures are those decisions (the monitor observes a request before it is decided, so its windows are the
same in both modes). ``--scale 0.2`` shortens every session for development runs.

Reports, with 95 % Wilson intervals: legitimate users flagged, legitimate requests flagged, legitimate requests
denied in deny mode, attacker sessions detected within 500 queries per kind (and queries to detection), the
malicious requests a deny-mode gateway would still have answered, and embeddings dropped. Writes
benchmarks/results/extraction_realistic_<embedder>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extraction_traffic import BUDGET, Session, build, schedule

from distillgate.extraction import ExtractionMonitor, HashingEmbedder, MiniLMEmbedder
from distillgate.policy import policy_from_data
from distillgate.policy.decision import Request, Usage, decide
from distillgate.policy.extraction_rules import SIGNAL_NAMES

ROOT = Path(__file__).resolve().parent.parent


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 5), round(min(1.0, c + h), 5)]


def policy(approved: dict[str, Any], action: str) -> Any:
    return policy_from_data({
        "policy_id": f"realistic-{action}", "allowed_projects": ["support-intents", "support-summaries", "safety-evals"],
        "allowed_outputs": ["labels", "logits", "summaries", "rubrics", "refusals"],
        "quotas": {"tokens_per_day": 10**13, "records_per_run": 10**9},
        "extraction": {"signals": {name: {"action": action} for name in SIGNAL_NAMES}, "approved": approved}})


class TableEmbedder:
    """Embeddings looked up from a precomputed table (the same vectors the model gives), computed when missing."""

    def __init__(self, table: dict[str, np.ndarray], base: Any) -> None:
        self.table, self.base, self.dim = table, base, base.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.table]
        if missing:
            self.table.update(zip(missing, self.base.embed(missing), strict=True))
        return np.stack([self.table[t] for t in texts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", choices=["minilm", "hashing"], default="minilm")
    ap.add_argument("--users", type=int, default=12, help="legitimate users per project (3 projects)")
    ap.add_argument("--attackers", type=int, default=6, help="sessions per attack kind")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--cache", default="", help="npz of embeddings kept between runs")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    traffic = build(args.users, args.attackers, args.seed, args.scale)
    sessions = traffic.sessions
    flag_policy, deny_policy = policy(traffic.policy_approved, "flag"), policy(traffic.policy_approved, "deny")
    base = MiniLMEmbedder() if args.embedder == "minilm" else HashingEmbedder()
    table: dict[str, np.ndarray] = {}
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        stored = np.load(cache, allow_pickle=False)
        table = dict(zip(stored["texts"].tolist(), stored["vecs"], strict=True))
    embedder = TableEmbedder(table, base)
    monitor = ExtractionMonitor(flag_policy, embedder=embedder, max_scopes=100_000)
    pieces = {p for project, texts in traffic.references.items() for t in texts
              for p in monitor.split(project, t).pieces}
    pieces |= {p for s in sessions for f in s.requests for p in monitor.split(f.project, f.prompt).pieces}
    t0 = time.perf_counter()
    todo = sorted(pieces - set(table))
    for start in range(0, len(todo), 1000):  # saved as it goes: an interrupted run keeps what it embedded
        embedder.embed(todo[start:start + 1000])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, texts=np.array(list(table)), vecs=np.stack(list(table.values())))
        print(f"embedded {min(start + 1000, len(todo))}/{len(todo)} new pieces", flush=True)
    embed_s = time.perf_counter() - t0
    print(f"{len(pieces)} distinct pieces embedded ({embed_s:.0f}s)", flush=True)
    for project, texts in traffic.references.items():
        monitor.set_reference(project, texts)

    order = schedule(sessions, args.seed + 1)
    denied_legit = 0
    first_legit_signals: dict[str, list[dict[str, Any]]] = {}
    t1 = time.perf_counter()
    observe_s: list[float] = []
    for count, (i, pos) in enumerate(order, 1):
        s: Session = sessions[i]
        f = s.requests[pos]
        t = time.perf_counter()
        signals = monitor.observe(f)
        observe_s.append(time.perf_counter() - t)
        req = Request(user=f.user, project=f.project, run=f.run, output_type=f.output_type, model="teacher",
                      max_tokens=f.max_tokens or 16, n=f.n, key_user=f.user, top_logprobs=f.top_logprobs,
                      logit_bias_size=len(f.logit_bias), signals=signals)
        denied = not decide(deny_policy, req, Usage()).allowed
        if signals:
            s.signals |= {x.name for x in signals}
            s.flagged_requests += 1
            if s.first_flag is None:
                s.first_flag = pos + 1
                if s.legit:
                    first_legit_signals[s.name] = [x.as_dict() for x in signals]
        if s.legit and denied:
            denied_legit += 1
        if not s.legit and s.malicious[pos] and not denied:
            s.malicious_unflagged += 1
        if count % 16 == 0:
            monitor.drain()
    monitor.drain()
    replay_s = time.perf_counter() - t1
    monitor.close()

    legit = [s for s in sessions if s.legit]
    attacks = [s for s in sessions if not s.legit]
    legit_reqs = sum(len(s.requests) for s in legit)
    flagged_reqs = sum(s.flagged_requests for s in legit)
    flagged_users = [s for s in legit if s.first_flag is not None]

    def detection(group: list[Session]) -> dict[str, Any]:
        hits = [s.first_flag for s in group if s.first_flag is not None and s.first_flag <= BUDGET]
        mal = sum(sum(s.malicious) for s in group)
        return {"sessions": len(group), "detected": len(hits), "rate": round(len(hits) / len(group), 4),
                "ci95": wilson(len(hits), len(group)),
                "median_queries_to_detection": statistics.median(hits) if hits else None,
                "max_queries_to_detection": max(hits) if hits else None,
                "malicious_requests": mal, "malicious_answered_in_deny_mode": sum(s.malicious_unflagged for s in group),
                "signals": sorted({n for s in group for n in s.signals})}

    kinds = sorted({s.kind for s in attacks})
    result = {
        "embedder": args.embedder, "seed": args.seed, "scale": args.scale, "requests": len(order),
        "legit_users": len(legit), "legit_requests": legit_reqs, "attack_sessions": len(attacks),
        "legit_users_flagged": len(flagged_users), "legit_users_flagged_rate": round(len(flagged_users) / len(legit), 4),
        "legit_users_flagged_ci95": wilson(len(flagged_users), len(legit)),
        "legit_requests_flagged": flagged_reqs, "legit_requests_flagged_rate": round(flagged_reqs / legit_reqs, 5),
        "legit_requests_flagged_ci95": wilson(flagged_reqs, legit_reqs),
        "legit_requests_denied_deny_mode": denied_legit,
        "flagged_legit": {s.name: sorted(s.signals) for s in flagged_users},
        "flagged_legit_first_signals": first_legit_signals,
        "legit_signal_counts": dict(Counter(n for s in flagged_users for n in s.signals)),
        "attacks": {k: detection([s for s in attacks if s.kind == k]) for k in kinds},
        "all_attacks": detection(attacks),
        "embeddings_dropped": monitor.dropped, "embed_seconds": round(embed_s, 1),
        "replay_seconds": round(replay_s, 1),
        "observe_us_p50": round(1e6 * float(np.percentile(observe_s, 50)), 1),
        "observe_us_p99": round(1e6 * float(np.percentile(observe_s, 99)), 1),
    }
    print(f"{'attack':30} {'detected':>9} {'95% CI':>16} {'median q':>9} {'max q':>6} {'mal. answered':>14}")
    for k in kinds:
        d = result["attacks"][k]  # type: ignore[index]
        print(f"{k:30} {d['detected']:>4}/{d['sessions']:<4} {d['ci95']!s:>16} "
              f"{d['median_queries_to_detection']!s:>9} {d['max_queries_to_detection']!s:>6} "
              f"{d['malicious_answered_in_deny_mode']:>6}/{d['malicious_requests']}")
    print(f"legit users flagged {len(flagged_users)}/{len(legit)} {result['legit_users_flagged_ci95']}; "
          f"legit requests flagged {flagged_reqs}/{legit_reqs} {result['legit_requests_flagged_ci95']}; "
          f"denied in deny mode {denied_legit}; embeddings dropped {monitor.dropped}")
    print(f"flagged legit: {json.dumps(first_legit_signals)}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"extraction_realistic_{args.embedder}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
