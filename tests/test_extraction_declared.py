"""Declared research shapes, template-diff pieces, exact word diffs, the two-sample signals, tenant isolation and
never-silent embedding (issue 24)."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from _extraction_support import banking_texts, coverage_prompts, feat
from distillgate.errors import ConfigError
from distillgate.extraction import ExtractionMonitor, HashingEmbedder, RequestFeatures
from distillgate.extraction.local import LocalMonitor
from distillgate.extraction.stats import MMDTest, outside_shift
from distillgate.extraction.templates import CHUNK_WORDS, TemplateSet
from distillgate.policy import policy_from_data

INTENTS = [f"intent_{i:02d}_{w}" for i, w in enumerate(["card", "transfer", "pin", "fee", "rate", "refund",
                                                           "atm", "topup", "limit", "fraud", "account"] * 7)]
LONG = ("Label the customer message with one intent from this list and answer with the intent only.\nIntents:\n"
        + "\n".join(f"- {i}" for i in INTENTS) + "\n\nCustomer message: {input}\nIntent:")
SHORT = "Intent of: {input}"


def rules(**signals: Any) -> Any:
    return policy_from_data({
        "policy_id": "declared", "allowed_projects": ["bank", "other"], "allowed_outputs": ["labels", "logits"],
        "extraction": {"signals": signals, "approved": {"bank": [
            {"name": "labelling", "output_types": ["labels"], "max_tokens": 16, "run_size": 5000,
             "templates": {"long": LONG, "short": SHORT}},
            {"name": "kd", "output_types": ["logits"], "top_logprobs": 20, "max_tokens": 1, "n": 4, "resamples": 4,
             "run_size": 20000, "templates": {"long": LONG}},
        ]}}})


def names(monitor: ExtractionMonitor, traffic: Sequence[RequestFeatures], drain: bool = False) -> list[set[str]]:
    out = []
    for f in traffic:
        out.append({s.name for s in monitor.observe(f)})
        if drain:
            monitor.drain()
    return out


def kd(text: str, **kw: Any) -> RequestFeatures:
    return feat(LONG.replace("{input}", text), output_type="logits", max_tokens=1, top_logprobs=20, logprobs=True,
                **kw)


def test_a_declared_kd_study_is_never_harvesting_and_the_same_shape_undeclared_is() -> None:
    texts = banking_texts()[:150]
    study = [kd(t, n=4) for t in texts for _ in range(3)]  # every prompt resampled 3 times, n=4, top_logprobs 20
    fired = names(ExtractionMonitor(rules()), study)
    assert not set().union(*fired), "a declared soft-label KD study raised signals"
    undeclared = names(ExtractionMonitor(), study)  # no declaration: full single-token distributions
    assert "logprob_harvest" in set().union(*undeclared)
    # resampling beyond what was declared is judged again
    over = [kd(texts[0]) for _ in range(30)]
    assert "logprob_harvest" in set().union(*names(ExtractionMonitor(rules()), over))


def test_a_shape_outside_the_declaration_is_not_covered_by_it() -> None:
    monitor = ExtractionMonitor(rules())
    sketch, _ = monitor.prepare(kd("my card is lost", n=8))  # n above the declared 4
    assert not sketch.declared
    sketch, _ = monitor.prepare(feat("Say something about opera", output_type="logits", max_tokens=1,
                                     top_logprobs=20, logprobs=True))  # no declared template
    assert not sketch.declared
    sketch, _ = monitor.prepare(kd("my card is lost", n=4))
    assert sketch.declared and sketch.template == "long" and sketch.resamples == 4


def test_the_declaration_rejects_unknown_keys_and_templates_without_a_slot() -> None:
    base = {"policy_id": "x", "allowed_projects": ["bank"], "allowed_outputs": ["labels"]}
    with pytest.raises(ConfigError) as err:
        policy_from_data({**base, "extraction": {"approved": {"bank": [{"name": "a", "top_logprob": 5}]}}})
    assert "top_logprob" in str(err.value)
    with pytest.raises(ConfigError) as err:
        policy_from_data({**base, "extraction": {"approved": {"bank": [{"templates": {"t": "no slot here"}}]}}})
    assert "{input}" in str(err.value)


class Recording:
    """An embedder that records what it was given (HashingEmbedder underneath)."""

    def __init__(self) -> None:
        self.base = HashingEmbedder()
        self.dim = self.base.dim
        self.seen: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.seen.extend(texts)
        return self.base.embed(texts)


def test_the_embedder_sees_the_variable_part_never_a_truncated_head() -> None:
    rec = Recording()
    monitor = ExtractionMonitor(rules(), embedder=rec, background=False)
    question = "Explain in detail how orbital mechanics works for a satellite launch."
    message = "I lost my card yesterday"
    # 1. injected after the message, inside the slot
    monitor.observe(feat(LONG.replace("{input}", f"{message} {question}")))
    # 2. injected in the middle of the taxonomy (the template's own text changed)
    cut = LONG.index("- intent_40")
    monitor.observe(feat(LONG[:cut] + f"Also: {question}\n" + LONG[cut:].replace("{input}", message)))
    assert rec.seen[0] == f"{message} {question}"
    assert any(question in piece for piece in rec.seen[1:]) and message in " ".join(rec.seen[1:])
    assert not any("intent_10" in piece for piece in rec.seen), "the template's taxonomy was embedded"
    # 3. a long prompt that fits no template is embedded whole, in chunks, not cut at the embedder's limit
    rec.seen.clear()
    tail = "the final secret question is about volcano monitoring"
    monitor.observe(feat(" ".join(["filler"] * 600) + " " + tail))
    assert all(len(p.split()) <= CHUNK_WORDS for p in rec.seen) and tail in rec.seen[-1]


def test_template_split_finds_slot_fills_and_insertions() -> None:
    ts = TemplateSet({"long": LONG})
    split = ts.split(LONG.replace("{input}", "where is my refund"))
    assert split.template == "long" and split.pieces == ("where is my refund",)
    assert ts.split("a prompt from elsewhere entirely").template is None


def test_exact_word_diff_keeps_distinct_messages_in_a_long_template_apart() -> None:
    """Distinct banking77 messages in a long 77-intent template are not near-twins (the MinHash estimate over the
    whole prompt called 63 % of them twins); a one-word sweep inside the template still is."""
    texts = random.Random(3).sample(banking_texts(), 300)
    labelling = [feat(LONG.replace("{input}", t), max_tokens=8) for t in texts]
    assert "template_sweep" not in set().union(*names(ExtractionMonitor(rules()), labelling))
    sweep = [feat(LONG.replace("{input}", f"What is the capital of country number {i}?"), max_tokens=8)
             for i in range(120)]
    assert "template_sweep" in set().union(*names(ExtractionMonitor(rules()), sweep))


def test_binomial_shift_statistic() -> None:
    assert outside_shift(2, 200, 0.02) == 0.0  # below the expectation: no evidence
    assert outside_shift(6, 6, 0.02) > 8  # six of six outside: a hydra head
    assert outside_shift(30, 200, 0.02) > 8  # 15 % outside: slow mixing
    assert outside_shift(8, 200, 0.02) < 3  # 4 %: a legitimate user's noise


def test_mmd_catches_a_shifted_window_and_not_a_same_distribution_one() -> None:
    emb = HashingEmbedder()
    bank = banking_texts()
    rng = random.Random(0)
    pool = rng.sample(bank, 1000)
    test = MMDTest(emb.embed(pool[:700]), calibration=60)
    same = emb.embed(pool[700:850])
    shifted = emb.embed(pool[850:970] + coverage_prompts(30))  # 20 % of the window from another domain
    assert test.ratio(same) < 1.0
    assert test.ratio(shifted) >= 1.0


def shuffled_bank() -> list[str]:
    """banking77's training messages in a fixed random order (the file is sorted by intent)."""
    texts = banking_texts()
    random.Random(11).shuffle(texts)
    return texts


def drift_rules() -> Any:
    return policy_from_data({"policy_id": "iso", "allowed_projects": ["bank", "other"], "allowed_outputs": ["labels"]})


def test_slow_mixing_and_a_wide_hydra_add_up() -> None:
    """15 % off-domain requests mixed into legitimate labelling, and 12 identities of 15 queries each, are caught;
    a legitimate labeller beside them is not flagged."""
    monitor = ExtractionMonitor(drift_rules(), embedder=HashingEmbedder(), background=False)
    bank = shuffled_bank()
    monitor.set_reference("bank", bank[:1500])
    rng = random.Random(5)
    cov = iter(coverage_prompts(2000, seed=9))
    slow_first = legit_flags = 0
    for i in range(400):
        bad = rng.random() < 0.15
        got = monitor.observe(feat(next(cov) if bad else rng.choice(bank[3000:6000]), user="slow", key="k-slow",
                                   run="slow"))
        if got and not slow_first:
            slow_first = i + 1
        legit_flags += bool(monitor.observe(feat(rng.choice(bank[6000:9000]), user="alice", key="k-alice",
                                                 run="a")))
    assert 0 < slow_first <= 400 and legit_flags == 0
    hydra_first = None
    for head in range(12):
        for j in range(15):
            got = monitor.observe(feat(next(cov), user=f"h{head}", key=f"k-h{head}", run=f"h{head}"))
            if got and hydra_first is None:
                hydra_first = head * 15 + j + 1
            assert not monitor.observe(feat(rng.choice(bank[6000:9000]), user="alice", key="k-alice", run="a"))
    assert hydra_first is not None and hydra_first <= 20


def test_one_tenant_never_raises_another_tenants_signals() -> None:
    """An attacker's sweep, off-domain traffic and tiny runs in a project leave a legitimate user there (and in
    another project) without a signal; with the attacker absent the legitimate traffic is the same."""
    bank = shuffled_bank()

    def run(with_attacker: bool) -> list[set[str]]:
        monitor = ExtractionMonitor(drift_rules(), embedder=HashingEmbedder(), background=False)
        monitor.set_reference("bank", bank[:1500])
        monitor.set_reference("other", bank[:1500])
        rng = random.Random(1)
        cov = iter(coverage_prompts(4000, seed=2))
        seen: list[set[str]] = []
        for i in range(220):
            if with_attacker:
                monitor.observe(feat(f"What is the capital of country {i % 40}?", user="mal", key="k-mal", run=f"m{i}"))
                monitor.observe(feat(next(cov), user=f"mh{i // 10}", key=f"k-mh{i // 10}", run=f"mh{i // 10}"))
                monitor.observe(feat(rng.choice(bank[3000:6000]), user="mal", key="k-mal", run=f"m{i}"))
            seen.append({s.name for s in monitor.observe(feat(bank[3000 + i], user="alice", key="k-alice",
                                                              run=f"a{i // 60}"))})
            seen.append({s.name for s in monitor.observe(feat(bank[4000 + i], user="bob", key="k-bob",
                                                              project="other", run="b"))})
        return seen

    assert not set().union(*run(with_attacker=True)), "an attacker raised a legitimate tenant's signals"
    assert not set().union(*run(with_attacker=False))


class Blocking:
    """An embedder that waits for ``go`` (a stuck or slow model)."""

    dim = 8

    def __init__(self) -> None:
        self.go = threading.Event()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.go.wait(10)
        out = np.zeros((len(texts), 8), dtype=np.float32)
        out[:, 0] = 1.0
        return out


def test_an_embedder_that_cannot_keep_up_applies_back_pressure_then_records_unobserved() -> None:
    emb = Blocking()
    monitor = ExtractionMonitor(embedder=emb, queue_size=1)
    local = LocalMonitor(monitor, embed_wait_s=0.05)
    local._ready = True  # the blocking embedder would hold a warm-up forever

    async def go() -> list[dict[str, Any]]:
        extras = []
        for i in range(4):
            _, extra = await local.observe(feat(f"message number {i}"))
            extras.append(extra["extraction"])  # type: ignore[arg-type]
        return extras

    extras = asyncio.run(go())
    unobserved = [e for e in extras if e.get("unobserved") == "embed_backlog"]
    assert unobserved, "a prompt that could not be embedded was not recorded as unobserved"
    assert all(e["features"]["unobserved"] == "embed_backlog" for e in unobserved)
    assert local.status().dropped == len(unobserved) >= 1
    emb.go.set()
    # with room in the queue (the embedder caught up) a request waits for it instead of being dropped
    monitor.drain()
    before = local.status().dropped
    extras = asyncio.run(go())
    monitor.close()
    assert local.status().dropped - before == sum(e.get("unobserved") is not None for e in extras)
    assert sum(e.get("unobserved") is not None for e in extras) < 4
