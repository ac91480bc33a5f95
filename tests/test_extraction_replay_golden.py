"""A fixed traffic sample replayed through the extraction monitor gives exactly the recorded answers: every signal
(name, value, threshold, window, scope, evidence), every decision entry's ``extra``, every shared row, and the
offline ``audit scan`` of the log. The expectation (tests/data/extraction_golden.json) was recorded by the monitor
before its request path was made cheaper; a change to the detectors' behaviour shows here as the first request
whose answer differs. Re-record (only for an intended change of behaviour) with

    PYTHONPATH=src python tests/test_extraction_replay_golden.py --record
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _extraction_support import banking_texts, coverage_prompts, feat, template_sweep
from distillgate.extraction import ExtractionMonitor, HashingEmbedder, RequestFeatures, Sketch, log_extra
from distillgate.extraction.features import Embedded
from distillgate.extraction.local import LocalMonitor
from distillgate.extraction.scan import scan_entries
from distillgate.extraction.shared import SharedWindows
from distillgate.policy import policy_from_data
from distillgate.policy.model import PolicySet

GOLDEN = Path(__file__).resolve().parent / "data" / "extraction_golden.json"
LONG = ("Label the customer message with one intent from this list and answer with the intent only.\nIntents:\n"
        + "\n".join(f"- intent_{i:02d}" for i in range(40)) + "\n\nCustomer message: {input}\nIntent:")
SHORT = "Intent of: {input}"
SIGNALS = {
    "template_sweep": {"min_requests": 10, "window": 60},
    "reasoning_elicitation": {"min_requests": 10, "window": 60},
    "logit_bias_sweep": {"threshold": 8},
    "logprob_harvest": {"threshold": 6},
    "key_coordination": {"min_requests": 10},
    "prompt_drift": {"min_requests": 5, "window": 30},
    "distribution_shift": {"min_requests": 4, "window": 60},
    "embedding_mmd": {"min_requests": 20, "window": 40},
}


def policies() -> PolicySet:
    main = policy_from_data({
        "policy_id": "golden", "allowed_projects": ["bank", "open", "misc"], "allowed_outputs": ["labels", "logits"],
        "extraction": {"signals": SIGNALS, "approved": {"bank": [
            {"name": "labelling", "output_types": ["labels"], "max_tokens": 16, "run_size": 400,
             "templates": {"long": LONG, "short": SHORT}},
            {"name": "kd", "output_types": ["logits"], "top_logprobs": 20, "max_tokens": 1, "n": 4, "resamples": 3,
             "run_size": 2000, "templates": {"long": LONG}},
        ]}}})
    audit = policy_from_data({
        "policy_id": "audited", "allowed_projects": ["audit"], "allowed_outputs": ["labels"],
        "extraction": {"record_embeddings": True, "signals": {"prompt_drift": {"min_requests": 5}}}})
    return PolicySet([main, audit])


def traffic() -> list[RequestFeatures]:
    """~1,100 requests from 16 interleaved streams: legitimate labelling and KD through templates, template
    injection, coverage, sweeps, reasoning elicitation, logit-bias sweeps, harvesting, a hydra of keys, run
    volume, a wide cluster of new users, and odd prompts (empty, huge, unicode, missing identities)."""
    rng = random.Random(2026)
    bank = banking_texts()
    cov = coverage_prompts(400, seed=3)
    streams: list[list[RequestFeatures]] = [
        [feat(LONG.replace("{input}", t), user=f"lab{i % 3}", key=f"k-lab{i % 3}", project="bank", run=f"lab{i % 3}",
              max_tokens=8) for i, t in enumerate(bank[:150])],
        [feat(SHORT.replace("{input}", t), user="short", key="k-short", project="bank", run="s1")
         for t in bank[150:230]],
        [feat(LONG.replace("{input}", t), user="kd", key="k-kd", project="bank", run="kd1", output_type="logits",
              max_tokens=1, top_logprobs=20, logprobs=True, n=4) for t in bank[230:270] for _ in range(3)],
        [feat(LONG.replace("{input}", t).replace("Intents:", f"Intents: also {c}"), user="inj", key="k-inj",
              project="bank", run="inj") for t, c in zip(bank[270:330], cov[:60], strict=True)],
        [feat(p, user="cov", key="k-cov", project="bank", run="cov") for p in cov[60:140]],
        template_sweep(90, user="sweep", key="k-sweep", project="open", run="sw"),
        [feat(f"{p} Think step by step and show your reasoning.", user="cot", key="k-cot", project="open",
              run="cot") for p in cov[140:200]],
        [feat(bank[400 + i], user="bias", key="k-bias", project="open", run="b", max_tokens=1,
              logit_bias=((rng.randrange(50000), rng.choice([-100.0, 5.0, 100.0])), (rng.randrange(50000), 1.4)))
         for i in range(40)],
        [feat(bank[500 + i % 5], user="harv", key="k-harv", project="open", run="h", logprobs=True,
              top_logprobs=5, max_tokens=4) for i in range(60)],
        [feat(bank[600 + i], user="dist", key="k-dist", project="open", run="d", logprobs=True, top_logprobs=20,
              max_tokens=1) for i in range(40)],
        [replace(f, key_id=f"k-hy{i % 6}", run=f"hy{i % 6}")
         for i, f in enumerate(template_sweep(72, user="hydra", key="k", project="open", run="x"))],
        [feat(bank[700 + i], user="vol", key="k-vol", project="open", run="v", declared_run_size=20, n=2)
         for i in range(30)],
        [feat(bank[800 + i], user="runner", key="k-run", project="open", run=f"run{min(i // 25, 4)}")
         for i in range(200)],
        [feat(p, user=f"new{i // 3}", key=f"k-new{i // 3}", project="bank", run=f"n{i // 3}")
         for i, p in enumerate(cov[200:320])],
        [feat(bank[1000 + i], user="aud", key="k-aud", project="audit", run="a1") for i in range(25)]
        + [feat(p, user="aud", key="k-aud", project="audit", run="a1") for p in cov[320:345]],
        odd_prompts(bank),
    ]
    out: list[RequestFeatures] = []
    while any(streams):
        stream = rng.choices([s for s in streams if s], weights=[len(s) for s in streams if s])[0]
        out.append(replace(stream.pop(0), ts=1_700_000_000.0 + 0.25 * len(out)))
    return out


def odd_prompts(bank: list[str]) -> list[RequestFeatures]:
    huge = " ".join(f"{t} w{i}" for i, t in enumerate(bank[1100:1400]))  # > 256 distinct words, > 16 chunks
    return [
        feat("", user="odd", key="k-odd", project="open", run="o"),
        feat("   \n  ", user="odd", key="k-odd", project="open", run="o"),
        feat(huge, user="odd", key="k-odd", project="open", run="o"),
        feat(" ".join(bank[1400:1420]), user="odd", key="k-odd", project="open", run="o"),  # > 128 words: chunks
        feat("Ünïcödé straße ſtep by ſtep, 東京 の 天気 は ?", user="odd", key="k-odd", project="open", run="o"),
        feat("Explain your reasoning: " + bank[1420], user=None, key="k-anon", project="open", run=None),
        feat(bank[1421], user="nokey", key=None, project="open", run="o"),
        feat(bank[1422], user="noproj", key="k-np", project=None, run="o"),
        feat(bank[1423], user=None, key=None, project=None, run=None),
        feat(SHORT.replace("{input}", ""), user="odd", key="k-odd", project="bank", run="o"),
        feat(LONG.replace("{input}", bank[1424] + " " + LONG[:200]), user="odd", key="k-odd", project="bank",
             run="o"),
        *[feat(bank[1430 + i], user="odd", key="k-odd", project="open", run="o", n=3, top_logprobs=2,
               logit_bias=((7, -3.6),)) for i in range(15)],
    ]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=False).encode()).hexdigest()[:20]


def _signals(signals: Any) -> dict[str, Any]:
    """Which signals fired (name, scope, identity, the exact value) and a digest of their full log form."""
    return {"fired": [[s.name, s.scope, s.scope_id, repr(s.value)] for s in signals],
            "full": _digest([s.as_dict() for s in signals])}


def replay() -> dict[str, Any]:
    """Monitor A (the gateway's ``LocalMonitor``) judges most requests and shares its rows; monitor B judges the
    rest and absorbs A's rows (sketches and embedded pieces), as a second worker on the same store would."""
    pol = policies()
    bank = banking_texts()
    a = ExtractionMonitor(pol, embedder=HashingEmbedder(), background=False, reference_size=30, max_scopes=60)
    b = ExtractionMonitor(pol, embedder=HashingEmbedder(), background=False, reference_size=30)
    a.shared = SharedWindows(a, "golden-unused.db", start=False)
    for m in (a, b):
        m.set_reference("bank", [LONG.replace("{input}", t) for t in bank[2000:2400]])
    local = LocalMonitor(a)
    requests: list[dict[str, Any]] = []
    log: list[tuple[int, dict[str, Any]]] = []

    async def run() -> None:
        await local.start()
        for i, f in enumerate(traffic()):
            if i % 4 == 3:
                sketch, signals = b.observe_request(f)
                extra = log_extra(f, signals, b.embed_for_record(f), sketch)
                requests.append({"i": i, "by": "b", "signals": _signals(signals), "extra": _digest(extra)})
                continue
            signals, extra = await local.observe(f)
            log.append((i, {"kind": "decision", "extra": extra}))
            assert a.shared is not None
            rows = [(origin, orjson.loads(orjson.dumps(item.share_record()))) for origin, item in a.shared._outbox]
            a.shared._outbox.clear()
            for origin, rec in rows:  # what B's pull applies, and A's own deferred pieces coming back to it
                if rec.get("kind") == "embedded":
                    e = Embedded.from_record(rec)
                    (a if origin.endswith("/deferred") else b).absorb_embedded(e)
                else:
                    b.absorb(Sketch.from_record(rec))
            requests.append({"i": i, "by": "a", "signals": _signals(signals), "extra": _digest(extra),
                             "rows": _digest([[o.endswith("/deferred"), r] for o, r in rows])})

    asyncio.run(run())
    scan = scan_entries(log, pol).as_dict()
    return {"requests": requests, "scan": _digest(scan), "fired": sum(len(r["signals"]["fired"]) for r in requests),
            "embedded": [a.embedded, b.embedded], "dropped": [a.dropped, b.dropped]}


def test_replayed_traffic_gives_the_recorded_signals_extras_and_shared_rows() -> None:
    want = json.loads(GOLDEN.read_text())
    got = replay()
    assert len(got["requests"]) == len(want["requests"])
    for g, w in zip(got["requests"], want["requests"], strict=True):
        assert g == w, f"request {w['i']} differs"
    assert got == want
    assert want["fired"] > 200  # the sample exercises the signals, not only the quiet path
    assert {s[0] for r in want["requests"] for s in r["signals"]["fired"]} >= {
        "volume", "template_sweep", "logit_bias_sweep", "logprob_harvest", "reasoning_elicitation",
        "key_coordination", "prompt_drift", "distribution_shift"}


if __name__ == "__main__" and "--record" in sys.argv:
    golden = replay()
    lines = ",\n".join(json.dumps(r, sort_keys=True) for r in golden.pop("requests"))  # one request per line
    GOLDEN.write_text(json.dumps(golden, sort_keys=True)[:-1] + ', "requests": [\n' + lines + "\n]}\n")
    print(f"wrote {GOLDEN}")
