"""Extraction-abuse replay: legitimate banking77 / XSTest runs and scripted attackers through ExtractionMonitor,
against a PRADA-style baseline (Juuti et al. 2019: Shapiro-Wilk test on each client's minimum-distance
distribution between successive queries).

    python benchmarks/extraction_replay.py [--embedder minilm|hashing] [--legit-runs 300] [--attackers 20]

Legitimate traffic: generation runs (banking77 train texts in one of two prompt templates, some with
top_logprobs=5 for KD, each declaring its size), eval runs (banking77 test), XSTest eval runs (250 safe + 200 unsafe
prompts, shuffled subsets). Attackers (each session 500 queries): coverage-seeking prompts from other domains (raw or
wrapped in the banking template), logit-bias probing a la Carlini et al. 2024 (one prompt, single-token +100 biases
swept over the vocabulary, top_logprobs=5, max_tokens=1), template sweeps, chain-of-thought harvesting over
unrelated tasks, and a slow attacker spread over 5 keys/users mixing coverage prompts and sweeps. All sessions are
interleaved in one stream; embeddings run on the monitor's background worker (drained every 16 requests).

Reports per-run false-positive rate, per-session detection within 500 queries and queries until detection, and
writes benchmarks/results/extraction_replay.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distillgate.extraction import ExtractionMonitor, HashingEmbedder, MiniLMEmbedder, RequestFeatures

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
QUERY_BUDGET = 500
GEN_TEMPLATES = [
    "Classify this banking customer message into one of the 77 intents. Answer with the label only.\nMessage: {}",
    "You label customer-support tickets for a bank. Reply with a single intent name.\nTicket: {}",
]
EVAL_TEMPLATE = "Intent of the following banking query (one label): {}"
XSTEST_TEMPLATE = "{}"


def read_csv(path: Path, column: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [row[column] for row in csv.DictReader(fh)]


@dataclass
class Session:
    name: str
    kind: str  # legit-gen, legit-eval, legit-xstest, or an attack name
    requests: list[RequestFeatures]
    legit: bool
    pos: int = 0
    first_flag: int | None = None
    signals: set[str] = field(default_factory=set)
    prada_flag: int | None = None


# -- traffic ----------------------------------------------------------------------------------------------------------

FIELDS = ["quantum field theory", "french pastry", "maritime law", "baroque opera", "volcanology", "tax treaties",
          "medieval poetry", "organic synthesis", "football tactics", "bird migration", "distributed databases",
          "ancient egypt", "knitting", "jazz harmony", "plate tectonics", "wine making", "cardiology", "epidemiology",
          "rocket propulsion", "game theory", "linguistics", "photosynthesis", "roman history", "chess openings",
          "machine learning", "urban planning", "marine biology", "philosophy of mind", "cryptography", "astronomy"]
ASKS = ["Write a detailed essay on", "List surprising facts about", "Draft an exam question covering",
        "Summarise the key debates in", "Write a short story that involves", "Give a glossary for",
        "Compare two schools of thought in", "Create a lesson plan on", "Explain to a child", "Write a poem about",
        "Translate into Spanish a paragraph about", "Write Python code that simulates", "Critique a claim about"]
ENTITIES = ["France", "Peru", "Norway", "Egypt", "India", "Japan", "Kenya", "Chile", "Spain", "Vietnam", "Canada",
            "Ghana", "Italy", "Qatar", "Latvia", "Mexico", "Nepal", "Oman", "Poland", "Brazil"]
ATTRS = ["capital", "population", "currency", "national dish", "highest mountain", "main export", "official language",
         "largest river", "founding year", "head of state", "climate", "national sport", "time zone", "flag colours"]
SWEEP_TEMPLATES = ["What is the {a} of {e}?", "Tell me the {a} of {e} in one sentence.",
                   "For a quiz: the {a} of {e} is what?"]
COT_PHRASES = ["Think step by step and show your reasoning.", "Explain your reasoning before the final answer.",
               "Show all your work.", "Walk me through your reasoning in detail.", "Let's think step by step."]


def coverage_prompt(rng: random.Random) -> str:
    return f"{rng.choice(ASKS)} {rng.choice(FIELDS)}, focusing on {rng.choice(FIELDS)} and {rng.choice(FIELDS)}."


def cot_task(rng: random.Random, xs: Sequence[str]) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randrange(2, 99), rng.randrange(2, 99), rng.randrange(2, 9)
        return f"A train travels {a} km in {c} hours and then {b} km more; what is its average speed?"
    if kind == 1:
        return f"Write a function that {rng.choice(['reverses', 'sorts', 'deduplicates', 'merges'])} a list of " \
               f"{rng.choice(['integers', 'strings', 'intervals', 'dates'])} efficiently."
    if kind == 2:
        return f"Why did {rng.choice(['the Roman Empire', 'the Ming dynasty', 'the Soviet Union'])} " \
               f"{rng.choice(['decline', 'expand', 'reform its economy'])}?"
    return rng.choice(xs)


def feat(prompt: str, *, user: str, key: str, project: str, run: str, **kw: object) -> RequestFeatures:
    return RequestFeatures(ts=0.0, user=user, key_id=key, project=project, run=run, model="teacher",
                           output_type=str(kw.pop("output_type", "labels")), prompt=prompt, **kw)  # type: ignore[arg-type]


def build(legit_runs: int, attackers: int, seed: int) -> tuple[list[Session], dict[str, list[str]]]:
    rng = random.Random(seed)
    train = read_csv(DATA / "banking77" / "train.csv", "text")
    test = read_csv(DATA / "banking77" / "test.csv", "text")
    xs = read_csv(DATA / "xstest" / "xstest_prompts.csv", "prompt")
    rng.shuffle(train)
    gen_pool, ref_pool = train[:2500], train[2500:3500]
    references = {
        "bank-gen": [GEN_TEMPLATES[i % 2].format(t) for i, t in enumerate(ref_pool)],
        "bank-eval": [EVAL_TEMPLATE.format(t) for t in ref_pool],
        "safety-eval": [XSTEST_TEMPLATE.format(p) for p in xs[1::2]],
    }
    sessions: list[Session] = []
    n_gen, n_eval = int(legit_runs * 0.55), int(legit_runs * 0.25)
    n_xs = legit_runs - n_gen - n_eval
    for i in range(n_gen):
        user = f"researcher{i % 12}"
        size = rng.randint(50, 300)
        tpl = GEN_TEMPLATES[i % 2]
        kd = i % 3 == 0
        reqs = [feat(tpl.format(t), user=user, key=f"key-{user}", project="bank-gen", run=f"gen-{i}",
                     max_tokens=8, top_logprobs=5 if kd else None, logprobs=kd, declared_run_size=size)
                for t in rng.sample(gen_pool, size)]
        sessions.append(Session(f"gen-{i}", "legit-gen", reqs, True))
    for i in range(n_eval):
        user = f"evaluator{i % 6}"
        size = rng.randint(100, 400)
        reqs = [feat(EVAL_TEMPLATE.format(t), user=user, key=f"key-{user}", project="bank-eval", run=f"eval-{i}",
                     max_tokens=8, top_logprobs=5, logprobs=True, declared_run_size=size)
                for t in rng.sample(test, size)]
        sessions.append(Session(f"eval-{i}", "legit-eval", reqs, True))
    for i in range(n_xs):
        user = f"safety{i % 4}"
        size = rng.randint(150, 450)
        reqs = [feat(XSTEST_TEMPLATE.format(p), user=user, key=f"key-{user}", project="safety-eval",
                     run=f"xstest-{i}", max_tokens=256, output_type="rubrics", declared_run_size=size)
                for p in rng.sample(xs, size)]
        sessions.append(Session(f"xstest-{i}", "legit-xstest", reqs, True))

    for a in range(attackers):
        user, key, run = f"att-cov{a}", f"key-att-cov{a}", f"cov-{a}"
        wrap = a % 2 == 1  # half hide their prompts in the project's template
        reqs = [feat(GEN_TEMPLATES[0].format(coverage_prompt(rng)) if wrap else coverage_prompt(rng), user=user,
                     key=key, project="bank-gen", run=run, max_tokens=512, output_type="labels")
                for _ in range(QUERY_BUDGET)]
        sessions.append(Session(f"coverage-{a}", "attack-coverage", reqs, False))

        base = rng.choice(["The", "Hello", "Answer:", "Q: What is 2+2? A:"])
        reqs = [feat(base, user=f"att-lb{a}", key=f"key-att-lb{a}", project="bank-gen", run=f"lb-{a}",
                     logit_bias=((rng.randrange(50_000) if a % 2 else 100 + j, 100.0),), top_logprobs=5,
                     logprobs=True, max_tokens=1)
                for j in range(QUERY_BUDGET)]
        sessions.append(Session(f"logit-bias-{a}", "attack-logit-bias", reqs, False))

        tpl = SWEEP_TEMPLATES[a % len(SWEEP_TEMPLATES)]
        combos = [(at, e) for at in ATTRS for e in ENTITIES]
        rng.shuffle(combos)
        reqs = [feat(tpl.format(a=at, e=e), user=f"att-sw{a}", key=f"key-att-sw{a}", project="bank-eval",
                     run=f"sw-{a}", max_tokens=64) for at, e in combos[:QUERY_BUDGET]]
        sessions.append(Session(f"template-sweep-{a}", "attack-template-sweep", reqs, False))

        reqs = [feat(f"{cot_task(rng, xs)} {rng.choice(COT_PHRASES)}", user=f"att-cot{a}", key=f"key-att-cot{a}",
                     project="safety-eval", run=f"cot-{a}", max_tokens=1024, output_type="rubrics")
                for _ in range(QUERY_BUDGET)]
        sessions.append(Session(f"cot-{a}", "attack-cot", reqs, False))

        reqs = []
        for j in range(QUERY_BUDGET):
            k = j % 5
            prompt = coverage_prompt(rng) if j % 2 else SWEEP_TEMPLATES[0].format(
                a=rng.choice(ATTRS), e=rng.choice(ENTITIES))
            reqs.append(feat(prompt, user=f"att-slow{a}-{k}", key=f"key-att-slow{a}-{k}", project="bank-gen",
                             run=f"slow-{a}-{k}", max_tokens=256))
        sessions.append(Session(f"slow-multikey-{a}", "attack-slow-multikey", reqs, False))
    return sessions, references


# -- PRADA baseline ---------------------------------------------------------------------------------------------------

class Prada:
    """Per client: d_min of each query to the client's earlier queries (L2 on unit embeddings); Shapiro-Wilk W on
    the d_min distribution; the client is flagged when W < delta (tested every ``every`` queries after ``start``)."""

    def __init__(self, start: int = 30, every: int = 5) -> None:
        self.start, self.every = start, every
        self.seen: dict[str, list[np.ndarray]] = {}
        self.dmins: dict[str, list[float]] = {}
        self.wmin: dict[str, float] = {}

    def observe(self, client: str, vec: np.ndarray) -> float | None:
        from scipy.stats import shapiro

        prev = self.seen.setdefault(client, [])
        if prev:
            sims = np.stack(prev) @ vec
            d = float(np.sqrt(max(0.0, 2.0 - 2.0 * float(sims.max()))))
            self.dmins.setdefault(client, []).append(d)
        prev.append(vec)
        ds = self.dmins.get(client, [])
        if len(ds) >= self.start and len(ds) % self.every == 0:
            w = float(shapiro(ds[-200:]).statistic) if np.ptp(ds[-200:]) > 0 else 0.0
            return w
        return None


class CachedEmbedder:
    def __init__(self, table: dict[str, np.ndarray], dim: int) -> None:
        self.table, self.dim = table, dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", choices=["minilm", "hashing"], default="minilm")
    ap.add_argument("--legit-runs", type=int, default=300)
    ap.add_argument("--attackers", type=int, default=20, help="sessions per attack type")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--cache", default="", help="npz file caching the embeddings between runs (same seed/sizes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extraction_replay.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    sessions, references = build(args.legit_runs, args.attackers, args.seed)

    t0 = time.perf_counter()
    base = MiniLMEmbedder() if args.embedder == "minilm" else HashingEmbedder()
    texts = sorted({f.prompt for s in sessions for f in s.requests} | {t for r in references.values() for t in r})
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        stored = np.load(cache, allow_pickle=False)
        table = dict(zip(stored["texts"].tolist(), stored["vecs"], strict=True))
        missing = [t for t in texts if t not in table]
        if missing:
            table.update(zip(missing, base.embed(missing), strict=True))
    else:
        table = dict(zip(texts, base.embed(texts), strict=True))
    if cache is not None:
        np.savez(cache, texts=np.array(list(table)), vecs=np.stack(list(table.values())))
    embed_s = time.perf_counter() - t0
    print(f"embedded {len(texts)} distinct prompts with {args.embedder} in {embed_s:.1f}s")

    monitor = ExtractionMonitor(embedder=CachedEmbedder(table, base.dim))
    for project, refs in references.items():
        monitor.set_reference(project, vectors=np.stack([table[t] for t in refs]))
    prada = Prada()
    prada_w: dict[str, list[tuple[int, float]]] = {}  # session -> (query index, W)

    rng = random.Random(args.seed + 1)
    active = list(range(len(sessions)))
    observe_times: list[float] = []
    steps = 0
    t1 = time.perf_counter()
    while active:
        i = rng.randrange(len(active))
        s = sessions[active[i]]
        f = s.requests[s.pos]
        t = time.perf_counter()
        signals = monitor.observe(f)
        observe_times.append(time.perf_counter() - t)
        if signals:
            s.signals |= {x.name for x in signals}
            if s.first_flag is None:
                s.first_flag = s.pos + 1
        client = f.run if s.legit else (f.key_id or "")
        w = prada.observe(f"{s.name}/{client}", table[f.prompt])
        if w is not None:
            prada_w.setdefault(s.name, []).append((s.pos + 1, w))
        s.pos += 1
        steps += 1
        if s.pos >= len(s.requests):
            active.pop(i)
        if steps % 16 == 0:
            monitor.drain()
    monitor.close()
    replay_s = time.perf_counter() - t1

    # PRADA: the largest delta (grid) keeping legitimate-run FPR <= 0.5% (calibrated on the legit runs: favourable)
    legit = [s for s in sessions if s.legit]
    attacks = [s for s in sessions if not s.legit]
    grid = [round(x, 3) for x in np.arange(0.50, 0.995, 0.005)]
    best = grid[0]
    for delta in grid:
        fp = sum(any(w < delta for _, w in prada_w.get(s.name, [])) for s in legit)
        if fp / len(legit) <= 0.005:
            best = delta
    for s in attacks:
        s.prada_flag = next((q for q, w in prada_w.get(s.name, []) if w < best), None)

    def summary(group: list[Session], attr: str) -> dict[str, object]:
        hits = [getattr(s, attr) for s in group if getattr(s, attr) is not None and getattr(s, attr) <= QUERY_BUDGET]
        return {"sessions": len(group), "detected": len(hits), "rate": round(len(hits) / len(group), 4),
                "median_queries_to_detection": statistics.median(hits) if hits else None,
                "max_queries_to_detection": max(hits) if hits else None}

    kinds = sorted({s.kind for s in attacks})
    result = {
        "embedder": args.embedder, "seed": args.seed, "requests": steps,
        "legit_runs": len(legit), "attack_sessions": len(attacks),
        "ours": {
            "legit_runs_flagged": sum(s.first_flag is not None for s in legit),
            "fpr": round(sum(s.first_flag is not None for s in legit) / len(legit), 4),
            "flagged_legit": {s.name: sorted(s.signals) for s in legit if s.first_flag is not None},
            "attacks": {k: summary([s for s in attacks if s.kind == k], "first_flag") for k in kinds},
            "all_attacks": summary(attacks, "first_flag"),
            "signals_by_attack": {k: sorted({n for s in attacks if s.kind == k for n in s.signals}) for k in kinds},
        },
        "prada": {
            "delta": best,
            "fpr": round(sum(any(w < best for _, w in prada_w.get(s.name, [])) for s in legit) / len(legit), 4),
            "attacks": {k: summary([s for s in attacks if s.kind == k], "prada_flag") for k in kinds},
            "all_attacks": summary(attacks, "prada_flag"),
        },
        "observe_us": {"mean": round(1e6 * statistics.fmean(observe_times), 1),
                       "p50": round(1e6 * float(np.percentile(observe_times, 50)), 1),
                       "p99": round(1e6 * float(np.percentile(observe_times, 99)), 1)},
        "embed_seconds": round(embed_s, 1), "replay_seconds": round(replay_s, 1),
        "embedding_jobs_dropped": monitor.dropped,
    }
    print(f"{'attack':26} {'ours det.':>10} {'median q':>9} {'PRADA det.':>11} {'median q':>9}")
    for k in kinds:
        o, p = result["ours"]["attacks"][k], result["prada"]["attacks"][k]  # type: ignore[index]
        print(f"{k:26} {o['rate']:>10.2%} {o['median_queries_to_detection']!s:>9} {p['rate']:>11.2%} "
              f"{p['median_queries_to_detection']!s:>9}")
    o, p = result["ours"]["all_attacks"], result["prada"]["all_attacks"]  # type: ignore[index]
    print(f"{'ALL':26} {o['rate']:>10.2%} {o['median_queries_to_detection']!s:>9} {p['rate']:>11.2%} "  # type: ignore[index]
          f"{p['median_queries_to_detection']!s:>9}")  # type: ignore[index]
    print(f"legit runs flagged: ours {result['ours']['fpr']:.2%} ({result['ours']['legit_runs_flagged']}/{len(legit)}), "  # type: ignore[index]
          f"PRADA {result['prada']['fpr']:.2%} at delta={best}")  # type: ignore[index]
    print(f"observe(): mean {result['observe_us']['mean']} us, p99 {result['observe_us']['p99']} us; "  # type: ignore[index]
          f"{steps} requests replayed in {replay_s:.1f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
