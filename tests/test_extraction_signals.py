"""Each extraction signal on crafted traffic: it fires on the attack and stays quiet on real legitimate traffic."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from _extraction_support import (
    banking_texts,
    coverage_prompts,
    feat,
    legit_banking,
    template_sweep,
    xstest_prompts,
)
from distillgate.errors import UserError
from distillgate.extraction import (
    ExtractionMonitor,
    HashingEmbedder,
    RequestFeatures,
    Signal,
    Sketch,
    features_record,
)


def fired(monitor: ExtractionMonitor, traffic: list[RequestFeatures]) -> tuple[int | None, set[str]]:
    """(index of the first request that got a signal, names of all signals seen)."""
    first, names = None, set()
    for i, f in enumerate(traffic):
        signals = monitor.observe(f)
        if signals and first is None:
            first = i
        names |= {s.name for s in signals}
    return first, names


def test_legitimate_banking_generation_run_fires_nothing() -> None:
    first, names = fired(ExtractionMonitor(), legit_banking(600, top_logprobs=5))
    assert first is None, names


def test_xstest_eval_run_fires_nothing() -> None:
    traffic = [feat(p, project="safety", run="eval-1", max_tokens=256, output_type="rubrics") for p in xstest_prompts()]
    first, names = fired(ExtractionMonitor(), traffic)
    assert first is None, names


def test_template_sweep_is_detected() -> None:
    first, names = fired(ExtractionMonitor(), template_sweep(120, user="eve", key="k-eve", run="sweep"))
    assert "template_sweep" in names
    assert first is not None and first < 40


def test_logit_bias_sweep_fires_and_a_fixed_label_bias_does_not() -> None:
    probe = [feat("Say one word.", user="mal", key="k-mal", run="probe", logit_bias=((1000 + i, 100.0),),
                  top_logprobs=5, max_tokens=1) for i in range(60)]
    first, names = fired(ExtractionMonitor(), probe)
    assert {"logit_bias_sweep", "logprob_harvest"} <= names and first is not None and first <= 20
    labels = tuple((t, 5.0) for t in range(77))  # a classifier run constraining output to its label tokens
    legit = legit_banking(200, logit_bias=labels)
    assert fired(ExtractionMonitor(), legit)[0] is None


def test_logprob_harvest_on_repeated_prompts() -> None:
    traffic = [feat(f"Complete: the secret word is {i % 3}", user="h", key="k-h", run="lp", top_logprobs=20,
                    max_tokens=4) for i in range(60)]
    first, names = fired(ExtractionMonitor(), traffic)
    assert "logprob_harvest" in names and first is not None and first < 40


def test_reasoning_elicitation_across_unrelated_tasks() -> None:
    tasks = xstest_prompts()[::5]
    traffic = [feat(f"{t} Think step by step and show all your reasoning.", user="c", key="k-c", run="cot",
                    output_type="summaries") for t in tasks]
    first, names = fired(ExtractionMonitor(), traffic)
    assert "reasoning_elicitation" in names and first is not None and first < 60


def test_volume_against_the_declared_run_size() -> None:
    monitor = ExtractionMonitor()
    traffic = legit_banking(80, declared_run_size=50)
    hits = [i for i, f in enumerate(traffic) if any(s.name == "volume" for s in monitor.observe(f))]
    assert hits and hits[0] == 59  # 60 records = 1.2 x 50
    sig = next(s for s in monitor.observe(traffic[0]) if s.name == "volume")
    assert sig.scope == "run" and sig.evidence["basis"] == "declared run size"


def test_volume_against_project_history() -> None:
    monitor = ExtractionMonitor()
    texts = banking_texts()
    for r in range(4):
        for t in texts[r * 100:(r * 100) + 100]:
            assert not [s for s in monitor.observe(feat(t, run=f"hist-{r}")) if s.name == "volume"]
    names = [s.name for t in texts[1000:1400] for s in monitor.observe(feat(t, run="big"))]
    assert "volume" in names


def test_several_keys_acting_as_one() -> None:
    monitor = ExtractionMonitor()
    keys = [f"k{i}" for i in range(5)]
    sweep = template_sweep(200)
    signals: list[Signal] = []
    legit = legit_banking(200, user="bob", key="k-bob", run="bob-run", declared_run_size=1000)
    for i, f in enumerate(sweep):  # interleaved with a legitimate user of the same project
        signals += monitor.observe(feat(f.prompt, user=f"u{i % 5}", key=keys[i % 5], run=f"r{i % 5}"))
        assert not monitor.observe(legit[i])
    coord = [s for s in signals if s.name == "key_coordination"]
    assert coord and coord[0].scope == "project" and len(coord[0].evidence["keys"]) >= 3  # type: ignore[arg-type]


def test_prompt_drift_runs_in_the_background() -> None:
    monitor = ExtractionMonitor(embedder=HashingEmbedder())
    monitor.set_reference("bank", [f"Message: {t}" for t in banking_texts()[:1500]])
    try:
        legit = [feat(f"Message: {t}", run="ok") for t in banking_texts("test")[:150]]
        _, names = fired(monitor, legit)
        monitor.drain()
        assert "prompt_drift" not in names
        other = [feat(p, user="cov", key="k-cov", run="cov") for p in coverage_prompts(150)]
        names = set()
        for f in other:
            names |= {s.name for s in monitor.observe(f)}
            monitor.drain()  # the worker's result applies to the identity's following requests
        assert "prompt_drift" in names
    finally:
        monitor.close()


class CountingEmbedder(HashingEmbedder):
    """The hashing embedder, counting the texts it was asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.texts.extend(texts)
        return super().embed(texts)


def test_a_repeated_prompt_is_embedded_once_while_cached() -> None:
    embedder = CountingEmbedder()
    monitor = ExtractionMonitor(embedder=embedder, background=False, embed_cache=2)
    for prompt in ["card lost", "card lost", "top up failed", "card lost", "exchange rate", "top up failed"]:
        monitor.observe(feat(prompt))
    # "card lost" twice from the cache; "top up failed" was evicted by "exchange rate" (LRU of 2)
    assert embedder.texts == ["card lost", "top up failed", "exchange rate", "top up failed"]
    assert monitor.embedded == 4
    uncached = ExtractionMonitor(embedder=embedder, background=False, embed_cache=0)
    embedder.texts.clear()
    uncached.observe(feat("card lost"))
    uncached.observe(feat("card lost"))
    assert embedder.texts == ["card lost", "card lost"]


def test_features_record_keeps_no_prompt_text_and_round_trips() -> None:
    secret = "my account number is 12345678 and my name is Zebulon"
    f = feat(secret, top_logprobs=3, logit_bias=((7, -100.0),), max_tokens=1, declared_run_size=10)
    rec = features_record(f, embedding=np.ones(8, dtype=np.float32) / np.sqrt(8))
    text = repr(rec)
    assert "12345678" not in text and "Zebulon" not in text.lower() and "zebulon" not in text
    back = Sketch.from_record(rec)
    orig = Sketch.of(f)
    assert np.array_equal(back.minhash, orig.minhash) and back.prompt_fp == orig.prompt_fp
    assert back.bias_pattern == orig.bias_pattern and back.top_logprobs == 3 and back.declared_run_size == 10
    assert back.embedding is not None and abs(float(back.embedding.sum()) - np.sqrt(8)) < 0.05


def test_from_openai_parses_the_request_shape() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 5, "logprobs": True,
            "logit_bias": {"50256": -100, "11": 3}, "max_tokens": 1, "n": 2}
    f = RequestFeatures.from_openai(body, user="a", key_id="k", project="p", run="r", output_type="labels")
    assert f.logit_bias == ((11, 3.0), (50256, -100.0)) and f.top_logprobs == 5 and f.n == 2 and f.prompt == "hi"
    with pytest.raises(UserError, match="logit_bias"):
        RequestFeatures.from_openai({"logit_bias": {"x": 1}}, user="a", key_id="k", project="p", run="r",
                                    output_type="labels")


def test_observe_is_thread_safe_and_memory_is_bounded() -> None:
    monitor = ExtractionMonitor(max_scopes=50)
    traffic = legit_banking(400)

    def worker(offset: int) -> None:
        for f in traffic[offset::4]:
            monitor.observe(feat(f.prompt, user=f"u{offset}", key=f"k{offset}", run=f"r{offset}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert monitor._scopes[("project", "bank")].count == 400
    for i in range(100):
        monitor.observe(feat("x", user=f"many{i}", key=f"km{i}", run=f"rm{i}"))
    assert len(monitor._scopes) <= 50


@pytest.mark.slow
def test_prompt_drift_with_minilm_separates_other_domains_from_banking() -> None:
    from distillgate.extraction import MiniLMEmbedder

    monitor = ExtractionMonitor(embedder=MiniLMEmbedder(), background=False)
    monitor.set_reference("bank", banking_texts()[:400])
    legit = [feat(t, run="ok", user="bob", key="k-bob") for t in banking_texts("test")[:40]]
    _, names = fired(monitor, legit)
    assert "prompt_drift" not in names
    other = [feat(p, user="cov", key="k-cov", run="cov") for p in coverage_prompts(30)]
    first, names = fired(monitor, other)
    assert "prompt_drift" in names and first is not None and first <= 25


def test_every_signal_and_rule_key_is_documented() -> None:
    from pathlib import Path

    from distillgate.policy.extraction_rules import SIGNAL_NAMES, ExtractionRules, SignalRule

    doc = (Path(__file__).resolve().parent.parent / "docs" / "extraction.md").read_text()
    missing = [n for n in (*SIGNAL_NAMES, *SignalRule.model_fields, *ExtractionRules.model_fields)
               if f"`{n}`" not in doc and f".{n}`" not in doc and f"`{n}." not in doc]
    assert not missing, f"document these in docs/extraction.md: {missing}"


def test_ring_content_names_its_rows_whatever_their_order_and_after_eviction() -> None:
    from distillgate.extraction.state import Ring

    a, b, c = (Sketch.of(f) for f in template_sweep(3))
    one, two, three = Ring(2), Ring(2), Ring(2)
    for s in (a, b):
        one.add(s.minhash8, s.vocab_size, s.fp_int, s.row_key)
    for s in (b, a):
        two.add(s.minhash8, s.vocab_size, s.fp_int, s.row_key)
    assert (one.content, one.size) == (two.content, two.size)
    one.add(c.minhash8, c.vocab_size, c.fp_int, c.row_key)  # full: `a` leaves
    for s in (b, c):
        three.add(s.minhash8, s.vocab_size, s.fp_int, s.row_key)
    assert one.content == three.content != two.content
    np.testing.assert_array_equal(np.sort(one.jaccard(a.minhash)), np.sort(three.jaccard(a.minhash)))


def test_scopes_share_ring_comparisons_only_when_their_rings_hold_the_same_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway compares a prompt once per distinct ring (see state.Ring). Alice sends a near-twin of each of
    Bob's banking questions just before Bob does, so for Bob's request the project ring finds a twin and his own
    rings do not: the memo must not carry one ring's answer to another, even when both rings are full."""
    from distillgate.extraction import state

    real = state.ScopeState.events
    seen: list[tuple[bool, bool]] = []  # (answer with the request's shared memo, answer computed afresh)

    def checked(self: state.ScopeState, sk: Sketch, fp: int,
                memo: dict[tuple[str, int, int], bool] | None = None) -> state.Events:
        got = real(self, sk, fp, memo)
        seen.append((got.twin, real(self, sk, fp, {}).twin))
        return got

    monkeypatch.setattr(state.ScopeState, "events", checked)
    monitor = ExtractionMonitor()
    for text in banking_texts()[:300]:
        monitor.observe(feat(f"{text} please", user="alice", key="k-alice", run="r-alice"))
        monitor.observe(feat(text, user="bob", key="k-bob", run="r-bob"))
    assert all(got == fresh for got, fresh in seen)
    assert {t for t, _ in seen} == {True, False}, "the traffic has scopes that disagree"


def test_a_prompt_without_reasoning_words_skips_the_regex_with_the_same_answer() -> None:
    from distillgate.extraction.features import _COT_RE, elicits_reasoning

    prompts = [*xstest_prompts()[:100], *banking_texts()[:300], "Think it through.", "SHOW YOUR WORK", "ſtep by step",
               "Keep an internal monologue", "Use a scratchpad", "<think>", "walk me through your thinking"]
    assert [elicits_reasoning(p) for p in prompts] == [_COT_RE.search(p) is not None for p in prompts]
    assert sum(elicits_reasoning(p) for p in prompts[-7:]) == 7


def test_a_ring_of_one_repeated_prompt_holds_no_twin_of_it_yet_finds_one_of_a_new_prompt() -> None:
    """``has_twin`` returns early when every row is the request's own prompt (a resampling run); the early exit
    must not hide a twin among other rows."""
    from distillgate.extraction.state import Ring

    same = Sketch.of(feat("my card was lost, what should I do?"))
    near = Sketch.of(feat("my card was stolen, what should I do?"))
    ring = Ring(8)
    for _ in range(8):
        ring.add(same.minhash8, same.vocab_size, same.fp_int, same.row_key, same.word_set)
    assert not ring.has_twin(same, same.fp_int)  # identical rows are not twins
    assert ring.has_twin(near, near.fp_int)  # one word apart
    ring.add(near.minhash8, near.vocab_size, near.fp_int, near.row_key, near.word_set)
    assert ring.has_twin(same, same.fp_int)


def test_the_twin_table_gives_the_direct_estimates_answer_on_rows_near_its_thresholds() -> None:
    """``Ring.has_twin`` reads the estimated word difference from a table (``state._twin_codes``); on traffic full of
    rows near the estimate's thresholds (prompts one to a dozen words apart, short and long, with and without their
    exact word sets, repeats of the prompt itself) it answers as the direct computation (``has_twin_full``)."""
    import random

    from distillgate.extraction.state import Ring

    rng = random.Random(5)
    texts = banking_texts()[:120]
    long_text = " ".join(f"w{i}" for i in range(300))  # beyond EXACT_MAX_WORDS: no word set, estimate only
    prompts: list[str] = []
    for t in texts:
        ws = t.split()
        prompts.append(t)
        for cut in (1, 2, 3, 4, 6, 9, 12):
            prompts.append(" ".join(w for i, w in enumerate(ws) if i % max(1, len(ws) // cut or 1) or i == 0))
            prompts.append(t + " " + " ".join(rng.choice(ws) + str(rng.randrange(9)) for _ in range(cut)))
        prompts.append(long_text + " " + " ".join(ws[: rng.randrange(1, 6)]))
    sketches = [Sketch.of(feat(p)) for p in prompts]
    ring = Ring(128)
    lazy = Ring(128)  # the same rows, its signatures block read only now and then (rows written at the read)
    answers = set()
    for i, s in enumerate(sketches):
        if i % 3 == 0:
            s = sketches[rng.randrange(max(1, i))]  # a prompt already in the ring
        got = ring.has_twin(s, s.fp_int)
        assert got == ring.has_twin_full(s, s.fp_int), prompts[i]
        answers.add(got)
        if i % 13 in (0, 1) or i % 29 == 0:
            assert lazy.has_twin(s, s.fp_int) == got
            np.testing.assert_array_equal(lazy.jaccard(s.minhash8), ring.jaccard(s.minhash8))
        ring.add(s.minhash8, s.vocab_size, s.fp_int, s.row_key, s.word_set)
        lazy.add(s.minhash, s.vocab_size, s.fp_int, s.row_key, s.word_set)
    assert answers == {True, False}
    for _ in range(8):  # a ring of one repeated prompt
        ring.add(sketches[0].minhash8, sketches[0].vocab_size, sketches[0].fp_int, sketches[0].row_key)
    assert ring.has_twin(sketches[0], sketches[0].fp_int) == ring.has_twin_full(sketches[0], sketches[0].fp_int)


def _mixed_traffic() -> list[RequestFeatures]:
    """Streams near and past every word-level threshold, interleaved: legitimate banking questions, a template
    sweep, logprob harvesting, a logit_bias sweep, reasoning elicitation on unrelated tasks, runs of several
    sizes, keys of one user turning suspicious (key_coordination)."""
    import random

    rng = random.Random(3)
    bank = banking_texts()
    streams: list[list[RequestFeatures]] = [
        legit_banking(150, user="ann", key="k-ann", run="r-ann"),
        template_sweep(120, user="bob", key="k-bob", run="r-bob"),
        [feat(bank[i % 7], user="cy", key=f"k-cy{i % 4}", run="r-cy", logprobs=True, top_logprobs=5)
         for i in range(120)],
        [feat(bank[i], user="dee", key="k-dee", run=f"r-dee{i // 40}", logit_bias=((i, -100.0),))
         for i in range(120)],
        [feat(f"{bank[i * 3]} Think step by step.", user="eve", key="k-eve", run="r-eve") for i in range(120)],
        [feat(bank[i + 500], user=f"new{i % 30}", key=f"k-new{i % 30}", run=f"r-new{i % 5}") for i in range(150)],
    ]
    out: list[RequestFeatures] = []
    while any(streams):
        s = rng.choice([s for s in streams if s])
        out.append(s.pop(0))
    return out


def test_a_quiet_scope_skips_the_window_statistics_with_the_same_signals_and_extras(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``_values``'s quiet-scope fast path (nothing in the scope's windows near a threshold: only ``volume`` is
    computed) fires the same signals, with the same values and evidence, as the full computation, on traffic that
    crosses every word-level threshold."""
    from distillgate.extraction import monitor as monitor_module
    from distillgate.extraction.monitor import log_extra

    def run() -> list[tuple[list[dict[str, object]], dict[str, object]]]:
        m = ExtractionMonitor()
        got = []
        for f in _mixed_traffic():
            sk, sig = m.observe_request(f)
            got.append(([x.as_dict() for x in sig], log_extra(f, sig, None, sk)))
        return got

    fast = run()
    monkeypatch.setattr(monitor_module, "QUIET", False)
    assert fast == run()
    names = {d["name"] for sig, _ in fast for d in sig}
    assert {"template_sweep", "logprob_harvest", "logit_bias_sweep", "reasoning_elicitation"} <= names, names
