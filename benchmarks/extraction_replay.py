"""Extraction-abuse replay: legitimate banking77 / XSTest runs and scripted attackers through the real gateway (or
straight into ExtractionMonitor), against a PRADA-style baseline (Juuti et al. 2019: Shapiro-Wilk test on each
client's minimum-distance distribution between successive queries).

    python benchmarks/extraction_replay.py [--via http|direct] [--embedder minilm|hashing] [--legit-runs 300]
                                           [--attackers 20] [--seed 7] [--concurrency 16] [--cache FILE.npz]

Legitimate traffic: generation runs (banking77 train texts in one of two prompt templates, some with
top_logprobs=5 for KD), eval runs (banking77 test), XSTest eval runs (250 safe + 200 unsafe prompts, shuffled
subsets). Attackers (each session 500 queries): coverage-seeking prompts from other domains (raw or wrapped in the
banking template), logit-bias probing a la Carlini et al. 2024 (one prompt, single-token +100 biases swept over the
vocabulary, top_logprobs=5, max_tokens=1), template sweeps, chain-of-thought harvesting over unrelated tasks, and a
slow attacker spread over 5 keys/users mixing coverage prompts and sweeps. Sessions are interleaved at random.

``--via http`` (default): ``distillgate gateway serve`` runs in its own process on loopback in front of the in-repo
fake teacher (tests/fakes/fake_upstream.py), with a policy whose extraction signals all only flag (every session
runs its full length), one API key per user, the chosen embedder and each project's approved reference (banking77
train texts the legitimate runs do not use; half of XSTest) from the gateway config's ``extraction`` section. Every
request is an OpenAI chat request (X-Policy-User/-Project/-Run/-Output-Type headers, max_tokens, logprobs,
top_logprobs, logit_bias, n as scripted) over ``--concurrency`` keep-alive connections, one request in flight per
session. Senders pause while the gateway's embedding backlog (its /metrics) is above ``--embed-backlog``, so the
figures describe a gateway whose embedder keeps up. Detection is read from the decision log the gateway wrote: a
session's queries-until-detection is the position of its first request whose entry carries a signal.
``--via direct``: the same stream straight into an ``ExtractionMonitor`` (embeddings computed up front, the worker
drained every 16 requests; declared run sizes are passed, which HTTP has no header for).

Reports per-run false-positive rate, per-session detection within 500 queries and queries until detection, the
PRADA baseline over the same sessions in the order sent (its delta calibrated on the legitimate runs to <= 0.5%
FPR), and writes benchmarks/results/extraction_replay_<embedder>[_http].json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distillgate.extraction import ExtractionMonitor, HashingEmbedder, MiniLMEmbedder, RequestFeatures
from distillgate.policy.extraction_rules import SIGNAL_NAMES

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
QUERY_BUDGET = 500
MODEL = "fake-teacher"
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


def embed_table(texts: Sequence[str], name: str, cache: Path | None) -> tuple[dict[str, np.ndarray], int, float]:
    """Every text's embedding (``cache``: an npz kept between runs), its dimension, and the seconds it took."""
    t0 = time.perf_counter()
    base = MiniLMEmbedder() if name == "minilm" else HashingEmbedder()
    table: dict[str, np.ndarray] = {}
    if cache is not None and cache.exists():
        stored = np.load(cache, allow_pickle=False)
        table = dict(zip(stored["texts"].tolist(), stored["vecs"], strict=True))
    missing = sorted(set(texts) - set(table))
    if missing:
        table.update(zip(missing, base.embed(missing), strict=True))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, texts=np.array(list(table)), vecs=np.stack(list(table.values())))
    return table, base.dim, time.perf_counter() - t0


def replay_direct(sessions: list[Session], references: dict[str, list[str]], table: dict[str, np.ndarray],
                  dim: int, seed: int) -> tuple[list[tuple[int, int]], dict[str, object]]:
    """The sessions straight into an ``ExtractionMonitor`` (no HTTP); fills each session's ``first_flag`` and
    ``signals``. Returns the stream order as (session, position) pairs and timing figures."""
    monitor = ExtractionMonitor(embedder=CachedEmbedder(table, dim))
    for project, refs in references.items():
        monitor.set_reference(project, vectors=np.stack([table[t] for t in refs]))
    rng = random.Random(seed + 1)
    active = list(range(len(sessions)))
    order: list[tuple[int, int]] = []
    observe_times: list[float] = []
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
        order.append((active[i], s.pos))
        s.pos += 1
        if s.pos >= len(s.requests):
            active.pop(i)
        if len(order) % 16 == 0:
            monitor.drain()
    monitor.close()
    return order, {"replay_seconds": round(time.perf_counter() - t1, 1), "embedding_jobs_dropped": monitor.dropped,
                   "observe_us": {"mean": round(1e6 * statistics.fmean(observe_times), 1),
                                  "p50": round(1e6 * float(np.percentile(observe_times, 50)), 1),
                                  "p99": round(1e6 * float(np.percentile(observe_times, 99)), 1)}}


# -- through the real gateway -----------------------------------------------------------------------------------------

def replay_policy() -> dict[str, object]:
    """Every extraction signal only flags, so each session runs its full length; quotas out of the way."""
    return {"policy_id": "replay", "allowed_projects": ["bank-gen", "bank-eval", "safety-eval"],
            "allowed_outputs": ["labels", "rubrics"], "approved_models": [MODEL],
            "quotas": {"tokens_per_day": 10**13, "records_per_run": 10**9},
            "extraction": {"signals": {name: {"action": "flag"} for name in SIGNAL_NAMES}}}


def request_body(f: RequestFeatures) -> dict[str, object]:
    """The OpenAI chat request the scripted traffic stands for."""
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": f.prompt}]}
    if f.max_tokens is not None:
        body["max_tokens"] = f.max_tokens
    if f.logprobs or f.top_logprobs:
        body["logprobs"] = True
    if f.top_logprobs:
        body["top_logprobs"] = f.top_logprobs
    if f.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in f.logit_bias}
    if f.n > 1:
        body["n"] = f.n
    return body


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn: graceful shutdown (lifespan), then exit
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def _send_all(url: str, sessions: list[Session], secrets: dict[str, str], seed: int, concurrency: int,
                    max_backlog: int) -> tuple[list[tuple[int, int]], dict[tuple[int, int], tuple[int, int]],
                                               list[float], dict[str, float]]:
    """``concurrency`` keep-alive connections; each picks a random session that has no request in flight (the
    same interleaving as the direct stream) and sends its next request. While the gateway's embedding backlog is
    above ``max_backlog`` (its /metrics), senders wait. Returns the send order, (status, decision index) per
    (session, position), latencies and the backlog seen."""
    import aiohttp

    rng = random.Random(seed + 1)
    idle = set(range(len(sessions)))  # sessions with requests left and none in flight
    busy: set[int] = set()
    order: list[tuple[int, int]] = []
    answers: dict[tuple[int, int], tuple[int, int]] = {}
    latencies: list[float] = []
    go = asyncio.Event()
    go.set()
    done = asyncio.Event()
    changed = asyncio.Condition()
    seen = {"max_backlog": 0.0, "waits": 0.0}

    async def watch(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with session.get(url + "/metrics") as r:
                backlog = _metric(await r.text(), "distillgate_extraction_embed_backlog")
            seen["max_backlog"] = max(seen["max_backlog"], backlog)
            if max_backlog and backlog > max_backlog:
                if go.is_set():
                    seen["waits"] += 1
                go.clear()
            else:
                go.set()
            await asyncio.sleep(0.2)

    async def sender(session: aiohttp.ClientSession) -> None:
        while True:
            async with changed:
                while not idle:
                    if not busy:
                        return
                    await changed.wait()
                i = rng.choice(sorted(idle))  # sorted: the choice depends on the seed only, not on set order
                idle.discard(i)
                busy.add(i)
            s = sessions[i]
            pos = s.pos
            f = s.requests[pos]
            s.pos += 1
            await go.wait()
            headers = {"Authorization": f"Bearer {secrets[f.user or '']}", "X-Policy-User": f.user or "",
                       "X-Policy-Project": f.project or "", "X-Policy-Run": f.run or "",
                       "X-Policy-Output-Type": f.output_type or ""}
            order.append((i, pos))
            t = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json=request_body(f), headers=headers) as r:
                await r.read()
                answers[(i, pos)] = (r.status, int(r.headers.get("x-distillgate-decision", "-1")))
            latencies.append(time.perf_counter() - t)
            async with changed:
                busy.discard(i)
                if s.pos < len(s.requests):
                    idle.add(i)
                changed.notify_all()

    connector = aiohttp.TCPConnector(limit=concurrency + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        watcher = asyncio.create_task(watch(session))
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))
        done.set()
        await watcher
        async with session.get(url + "/metrics") as r:
            final = await r.text()
    seen["dropped"] = _metric(final, "distillgate_extraction_embeddings_dropped")
    return order, answers, latencies, seen


def replay_http(sessions: list[Session], references: dict[str, list[str]], args: argparse.Namespace,
                work: Path) -> tuple[list[tuple[int, int]], dict[str, object]]:
    """Start the fake teacher and ``distillgate gateway serve`` (own processes, loopback), send every request over
    HTTP, stop both, then read detection from the decision log the gateway wrote."""
    from distillgate.keys import KeyStore

    db = work / "replay.db"
    policy = work / "policy.json"
    policy.write_text(json.dumps(replay_policy()))
    keys = KeyStore(db)  # one API key per user
    secrets = {user: keys.create(user)[1] for user in sorted({f.user or "" for s in sessions for f in s.requests})}
    keys.close()
    refs = {}
    for project, texts in references.items():
        refs[project] = str(work / f"approved-{project}.jsonl")
        Path(refs[project]).write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n" for t in texts))
    config = {"db": str(db), "policy": str(policy),
              "extraction": {"embedder": args.embedder, "references": refs, "embed_cache": args.embed_cache}}
    with served_gateway(work, "gateway", config, ready_timeout=1800) as (base_url, startup_s):
        print(f"gateway up in {startup_s:.1f}s (references embedded); replaying over HTTP", flush=True)
        t1 = time.perf_counter()
        order, answers, latencies, seen = asyncio.run(_send_all(
            base_url, sessions, secrets, args.seed, args.concurrency, args.embed_backlog))
        replay_s = time.perf_counter() - t1

    from distillgate.ledger.store import Store

    with Store.open(db) as store:
        entries = {e.index: e.body for e in store.entries(kind="decision")}
    statuses: dict[int, int] = {}
    not_allowed = 0
    for (i, pos), (status, index) in answers.items():
        statuses[status] = statuses.get(status, 0) + 1
        if index not in entries:  # answered before any decision (a malformed request): nothing logged
            continue
        body = entries[index]
        not_allowed += body["decision"] != "allow"
        signals = body.get("extra", {}).get("extraction", {}).get("signals", [])
        if signals:
            s = sessions[i]
            s.signals |= {x["name"] for x in signals}
            assert "EXTRACTION_FLAGGED" in body["reasons"], body["reasons"]
            if s.first_flag is None or pos + 1 < s.first_flag:
                s.first_flag = pos + 1
    return order, {
        "concurrency": args.concurrency, "embed_backlog_limit": args.embed_backlog, "embed_cache": args.embed_cache,
        "gateway_startup_seconds": round(startup_s, 1), "replay_seconds": round(replay_s, 1),
        "requests_per_second": round(len(answers) / replay_s, 1),
        "latency_ms": {"p50": round(1e3 * float(np.percentile(latencies, 50)), 1),
                       "p99": round(1e3 * float(np.percentile(latencies, 99)), 1)},
        "http_statuses": {str(k): v for k, v in sorted(statuses.items())}, "decisions_not_allowed": not_allowed,
        "decision_entries": len(entries), "max_embed_backlog_seen": seen["max_backlog"],
        "backlog_pauses": int(seen["waits"]), "embedding_jobs_dropped": int(seen["dropped"]),
    }


@contextmanager
def served_gateway(work: Path, name: str, config: dict[str, object], *,
                   ready_timeout: float) -> Iterator[tuple[str, float]]:
    """The fake upstream and a real `gateway serve` on loopback with ``config`` (host, port and the fake's upstream
    filled in; written to ``work/NAME.json``, logs in ``work/NAME.log``). Yields the gateway's base URL and the
    seconds it took to answer /healthz; both processes are stopped on exit."""
    fake_port, gw_port = _free_port(), _free_port()
    full = {**config, "host": "127.0.0.1", "port": gw_port,
            "upstreams": {"fake": {"base_url": f"http://127.0.0.1:{fake_port}/v1"}}}
    (work / f"{name}.json").write_text(json.dumps(full))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    fake = _start([sys.executable, str(ROOT / "tests" / "fakes" / "fake_upstream.py"), "--port", str(fake_port)],
                  work / "fake.log", env)
    gateway = None
    try:
        _wait_up(f"http://127.0.0.1:{fake_port}/v1/models", fake, work / "fake.log", 60)
        t0 = time.perf_counter()
        gateway = _start([sys.executable, "-m", "distillgate", "gateway", "serve", "--config",
                          str(work / f"{name}.json")], work / f"{name}.log", env)
        _wait_up(f"http://127.0.0.1:{gw_port}/healthz", gateway, work / f"{name}.log", ready_timeout)
        yield f"http://127.0.0.1:{gw_port}", time.perf_counter() - t0
    finally:
        if gateway is not None:
            _stop(gateway)
        _stop(fake)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- report -----------------------------------------------------------------------------------------------------------

def prada_scores(sessions: list[Session], order: list[tuple[int, int]],
                 table: dict[str, np.ndarray]) -> dict[str, list[tuple[int, float]]]:
    """PRADA's W statistics per session over the stream in the order it was sent: session -> (query, W)."""
    prada = Prada()
    out: dict[str, list[tuple[int, float]]] = {}
    for i, pos in order:
        s = sessions[i]
        f = s.requests[pos]
        client = f.run if s.legit else (f.key_id or "")
        w = prada.observe(f"{s.name}/{client}", table[f.prompt])
        if w is not None:
            out.setdefault(s.name, []).append((pos + 1, w))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--via", choices=["http", "direct"], default="http",
                    help="http: through `distillgate gateway serve`; direct: into ExtractionMonitor")
    ap.add_argument("--embedder", choices=["minilm", "hashing"], default="minilm")
    ap.add_argument("--legit-runs", type=int, default=300)
    ap.add_argument("--attackers", type=int, default=20, help="sessions per attack type")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--concurrency", type=int, default=16, help="http: client connections")
    ap.add_argument("--embed-backlog", type=int, default=256,
                    help="http: senders wait while the gateway's embedding backlog is above this (0: never)")
    ap.add_argument("--embed-cache", type=int, default=65536, help="http: the gateway's extraction.embed_cache")
    ap.add_argument("--cache", default="", help="npz file caching the embeddings between runs (direct replay and "
                    "PRADA)")
    ap.add_argument("--out", default="", help="default benchmarks/results/extraction_replay_<embedder>[_http].json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    sessions, references = build(args.legit_runs, args.attackers, args.seed)
    texts = sorted({f.prompt for s in sessions for f in s.requests} | {t for r in references.values() for t in r})
    cache = Path(args.cache) if args.cache else None
    timing: dict[str, object]
    if args.via == "direct":
        table, dim, embed_s = embed_table(texts, args.embedder, cache)
        print(f"embedded {len(texts)} distinct prompts with {args.embedder} in {embed_s:.1f}s", flush=True)
        order, timing = replay_direct(sessions, references, table, dim, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="extraction-replay-") as tmp:
            order, timing = replay_http(sessions, references, args, Path(tmp))
        print(f"{len(order)} requests through the gateway in {timing['replay_seconds']}s "
              f"({timing['requests_per_second']} req/s); embedding for PRADA", flush=True)
        table, dim, embed_s = embed_table(texts, args.embedder, cache)
    prada_w = prada_scores(sessions, order, table)

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
    legit_kinds = sorted({s.kind for s in legit})
    result = {
        "via": args.via, "embedder": args.embedder, "seed": args.seed, "requests": len(order),
        "legit_runs": len(legit), "attack_sessions": len(attacks),
        "ours": {
            "legit_runs_flagged": sum(s.first_flag is not None for s in legit),
            "fpr": round(sum(s.first_flag is not None for s in legit) / len(legit), 4),
            "flagged_legit": {s.name: sorted(s.signals) for s in legit if s.first_flag is not None},
            "legit_flagged_by_kind": {k: sum(s.first_flag is not None for s in legit if s.kind == k)
                                      for k in legit_kinds},
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
        "embed_seconds": round(embed_s, 1), **timing,
    }
    print(f"{'attack':26} {'ours det.':>10} {'median q':>9} {'max q':>6} {'PRADA det.':>11} {'median q':>9}")
    for k in kinds:
        o, p = result["ours"]["attacks"][k], result["prada"]["attacks"][k]  # type: ignore[index]
        print(f"{k:26} {o['rate']:>10.2%} {o['median_queries_to_detection']!s:>9} "
              f"{o['max_queries_to_detection']!s:>6} {p['rate']:>11.2%} {p['median_queries_to_detection']!s:>9}")
    o, p = result["ours"]["all_attacks"], result["prada"]["all_attacks"]  # type: ignore[index]
    print(f"{'ALL':26} {o['rate']:>10.2%} {o['median_queries_to_detection']!s:>9} "  # type: ignore[index]
          f"{o['max_queries_to_detection']!s:>6} {p['rate']:>11.2%} "  # type: ignore[index]
          f"{p['median_queries_to_detection']!s:>9}")  # type: ignore[index]
    print(f"legit runs flagged: ours {result['ours']['fpr']:.2%} ({result['ours']['legit_runs_flagged']}/{len(legit)}), "  # type: ignore[index]
          f"PRADA {result['prada']['fpr']:.2%} at delta={best}")  # type: ignore[index]
    print(f"{len(order)} requests replayed ({args.via}) in {timing['replay_seconds']}s")
    suffix = "_http" if args.via == "http" else ""
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"extraction_replay_{args.embedder}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
