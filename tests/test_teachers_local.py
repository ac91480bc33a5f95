"""The local teacher on the real SmolLM2-135M-Instruct model (slow: loads the model once per module)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import pytest
import torch

from distillgate.teachers.engine import LocalModel, SamplingParams
from distillgate.teachers.loading import DEFAULT_MODEL, cache_root, load_model, resolve_spec
from distillgate.teachers.local import LocalTeacher
from distillgate.teachers.registry import load_local_model

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": (
    "You sort bank customer messages into one of these intents: card arrival, card linking, exchange rate, "
    "lost or stolen card, pin blocked, top up limits. Answer with the intent only.")}
QUESTIONS = ["Where is my new card? It has not arrived.", "I lost my card yesterday",
             "What exchange rate do you use for euros?"]
LABELS = ["card arrival", "card linking", "exchange rate", "lost or stolen card", "pin blocked", "top up limits"]


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalModel]:
    torch.set_num_threads(2)
    yield load_local_model(DEFAULT_MODEL)


def _prompts() -> list[list[dict[str, str]]]:
    return [[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS]


def _direct_logprobs(engine: LocalModel, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt_ids + answer_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer_ids))
    return logprobs[positions, torch.tensor(answer_ids)]


def test_card_describes_the_packaged_gguf(engine: LocalModel) -> None:
    card = engine.card()
    assert card.model_id == DEFAULT_MODEL
    assert card.file_sha256 is not None and len(card.file_sha256) == 64
    assert card.quantisation is not None and card.quantisation.startswith("MOSTLY_Q4_1")
    assert card.chat_template_sha256 is not None and len(card.chat_template_sha256) == 64
    assert card.parameter_count == sum(p.numel() for p in engine.model.parameters())
    assert 130_000_000 < card.parameter_count < 140_000_000


def test_disk_cache_reloads_the_same_weights(engine: LocalModel) -> None:
    cached = cache_root() / "models"
    assert any((d / "distillgate-card.json").is_file() for d in cached.iterdir())
    again = load_model(resolve_spec(DEFAULT_MODEL))
    assert again.from_cache
    assert again.card == engine.card()
    ids = torch.tensor([engine.encode(_prompts()[0])])
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, engine.model(ids).logits)


def test_fixed_seed_sampling_is_deterministic(engine: LocalModel) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    first = engine.generate(_prompts()[:1], params)[0]
    second = engine.generate(_prompts()[:1], params)[0]
    assert first.token_ids == second.token_ids and first.text == second.text
    others = [engine.generate(_prompts()[:1], SamplingParams(max_tokens=16, temperature=1.0, seed=s))[0].token_ids
              for s in (1, 2, 3)]
    assert any(o != first.token_ids for o in others)  # the seed matters


def test_logprobs_match_a_direct_forward_pass(engine: LocalModel) -> None:
    gen = engine.generate(_prompts()[:2], SamplingParams(max_tokens=10, temperature=0.0, logprobs=True,
                                                          top_logprobs=5))
    for prompt, g in zip(_prompts()[:2], gen, strict=True):
        assert g.logprobs is not None and len(g.logprobs) == g.completion_tokens
        direct = _direct_logprobs(engine, engine.encode(prompt), g.token_ids)
        ours = torch.tensor([lp.logprob for lp in g.logprobs])
        assert torch.allclose(ours, direct, atol=1e-4), (ours, direct)
        for lp in g.logprobs:  # greedy: the chosen token is the top-1 alternative
            assert len(lp.top) == 5 and lp.top[0][0] == lp.token_id
            assert [t[2] for t in lp.top] == sorted((t[2] for t in lp.top), reverse=True)


def test_answer_logprobs_match_a_direct_forward_pass(engine: LocalModel) -> None:
    prompt = _prompts()[1]
    result = engine.answer_logprobs(prompt, "lost or stolen card", top_k=20)
    direct = _direct_logprobs(engine, engine.encode(prompt), result.answer_ids)
    assert torch.allclose(result.token_logprobs, direct, atol=1e-4)
    assert result.top_ids.shape == (len(result.answer_ids), 20)
    ids, logits = engine.answer_logits(prompt, "lost or stolen card")
    assert ids == result.answer_ids and logits.shape == (len(ids), engine.model.config.vocab_size)


def test_prefix_cache_gives_identical_generations(engine: LocalModel) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=True)
    with_cache = engine.generate(_prompts(), params, prefix_cache=True)
    without = engine.generate(_prompts(), params, prefix_cache=False)
    for a, b in zip(with_cache, without, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.logprobs is not None and b.logprobs is not None
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    alone = engine.generate(_prompts()[2:], params)[0]  # batching (left padding) does not change the answer
    assert alone.token_ids == with_cache[2].token_ids


def test_label_scores_sum_to_one_and_match_per_label_forward_passes(engine: LocalModel) -> None:
    dists = engine.score_labels_batch(_prompts(), LABELS, rows_per_pass=2)
    no_cache = engine.score_labels_batch(_prompts(), LABELS, prefix_cache=False, rows_per_pass=1)
    for prompt, dist, other in zip(_prompts(), dists, no_cache, strict=True):
        assert set(dist) == set(LABELS)
        assert abs(sum(dist.values()) - 1.0) < 1e-5 and all(p >= 0 for p in dist.values())
        assert max(abs(dist[k] - other[k]) for k in LABELS) < 1e-4
        prompt_ids = engine.encode(prompt)
        sums = torch.stack([
            _direct_logprobs(engine, prompt_ids, engine.tokenizer(label, add_special_tokens=False)["input_ids"]
                             + [engine.eos_id]).sum() for label in LABELS])
        reference = torch.softmax(sums, dim=0)
        assert max(abs(dist[k] - float(reference[i])) for i, k in enumerate(LABELS)) < 1e-4
    assert max(dists[1], key=dists[1].__getitem__) == "lost or stolen card"
    single = engine.score_labels(_prompts()[1], LABELS)
    assert max(abs(single[k] - dists[1][k]) for k in LABELS) < 1e-4


def test_kept_prefix_is_reused_across_calls_and_by_single_requests(engine: LocalModel) -> None:
    engine.clear_prefix_cache()
    hits, misses = engine.prefix_stats["hits"], engine.prefix_stats["misses"]
    first = engine.score_labels_batch(_prompts()[:1], LABELS)  # one chat prompt: its head (the system turn) is kept
    assert engine.prefix_stats["misses"] == misses + 1
    rest = engine.score_labels_batch(_prompts()[1:], LABELS)  # a later call starts with the kept head: reused
    assert engine.prefix_stats["hits"] == hits + 1 and engine.prefix_stats["misses"] == misses + 1
    reference = engine.score_labels_batch(_prompts(), LABELS, prefix_cache=False, rows_per_pass=1)
    for dist, ref in zip(first + rest, reference, strict=True):
        assert max(abs(dist[k] - ref[k]) for k in LABELS) < 1e-4
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True)
    cached = engine.generate(_prompts()[2:], params)[0]  # generation reuses the same kept head
    assert engine.prefix_stats["hits"] == hits + 2
    plain = engine.generate(_prompts()[2:], params, prefix_cache=False)[0]
    assert cached.token_ids == plain.token_ids
    assert cached.logprobs is not None and plain.logprobs is not None
    assert max(abs(x.logprob - y.logprob) for x, y in zip(cached.logprobs, plain.logprobs, strict=True)) < 1e-4
    head = engine.head_length(_prompts()[0], engine.encode(_prompts()[0]))
    assert 0 < head < len(engine.encode(_prompts()[0]))
    assert engine.head_length("plain text", engine.encode("plain text")) == 0


def test_length_normalised_label_scores_use_mean_token_logprobs(engine: LocalModel) -> None:
    sums, lengths = engine.label_logprob_sums(_prompts()[:1], LABELS)
    assert lengths == [len(engine.tokenizer(label, add_special_tokens=False)["input_ids"]) + 1 for label in LABELS]
    dist = engine.score_labels_batch(_prompts()[:1], LABELS, length_normalise=True)[0]
    reference = torch.softmax(sums[0] / torch.tensor(lengths, dtype=torch.float32), dim=0)
    assert abs(sum(dist.values()) - 1.0) < 1e-5
    assert max(abs(dist[k] - float(reference[i])) for i, k in enumerate(LABELS)) < 1e-5
    summed = engine.score_labels_batch(_prompts()[:1], LABELS)[0]
    assert max(abs(summed[k] - float(torch.softmax(sums[0], dim=0)[i])) for i, k in enumerate(LABELS)) < 1e-5


def test_stop_strings_and_length(engine: LocalModel) -> None:
    base = engine.generate(_prompts()[:1], SamplingParams(max_tokens=20, temperature=0.0))[0]
    assert len(base.text) > 4
    stop = base.text[2:4]
    stopped = engine.generate(_prompts()[:1], SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop" and stopped.text == base.text[:base.text.find(stop)]
    short = engine.generate(_prompts()[:1], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert short.finish_reason == "length" and short.completion_tokens == 3


def test_teacher_serves_concurrent_chat_and_streaming(engine: LocalModel) -> None:
    body = {"messages": _prompts()[0], "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 3}

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]], int]:
        teacher = LocalTeacher(engine, batch_wait_s=0.05)
        answers = await asyncio.gather(*(teacher.chat_completion({**body, "messages": p}) for p in _prompts()))
        chunks = [c async for c in teacher.stream_chat_completion({**body, "stream": True})]
        batches = teacher.batches_run
        await teacher.aclose()
        return list(answers), chunks, batches

    answers, chunks, batches = asyncio.run(scenario())
    assert batches <= 3  # the three concurrent requests shared at least one batch... or ran one by one at worst
    direct = engine.generate(_prompts(), SamplingParams(max_tokens=12, temperature=0.0))
    for answer, gen in zip(answers, direct, strict=True):
        choice = answer["choices"][0]  # type: ignore[index]
        assert choice["message"]["content"] == gen.text
        assert len(choice["logprobs"]["content"]) == gen.completion_tokens
        assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 3
        assert answer["usage"]["completion_tokens"] == gen.completion_tokens  # type: ignore[index]
        assert answer["usage"]["prompt_tokens"] == gen.prompt_tokens  # type: ignore[index]
    streamed = "".join(c["choices"][0]["delta"].get("content", "")  # type: ignore[index]
                       for c in chunks if c["choices"])
    assert streamed == direct[0].text
    assert chunks[-1]["usage"]["completion_tokens"] == direct[0].completion_tokens  # type: ignore[index]


def test_cli_teacher_chat_prints_a_completion(cli_run) -> None:  # type: ignore[no-untyped-def]
    result = cli_run("teacher", "chat", "--max-tokens", "8", "--json", "What is the capital of France?",
                     env={"DISTILLGATE_CACHE": str(cache_root()), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["object"] == "chat.completion" and payload["model"] == DEFAULT_MODEL
    assert "Paris" in payload["choices"][0]["message"]["content"]
    bad = cli_run("teacher", "chat", "--model", "local/nope", "hi")
    assert bad.returncode == 1 and "unknown local teacher" in bad.stderr


def test_teacher_rejects_a_prompt_longer_than_the_context(engine: LocalModel) -> None:
    from distillgate.errors import UpstreamError

    async def scenario() -> None:
        teacher = LocalTeacher(engine)
        try:
            await teacher.chat_completion({"messages": [{"role": "user", "content": "word " * 9000}]})
        finally:
            await teacher.aclose()

    with pytest.raises(UpstreamError) as info:
        asyncio.run(scenario())
    assert info.value.status == 400 and "context" in info.value.message
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_label_choices_answer_with_the_most_probable_label(engine: LocalModel) -> None:
    """The ``label_choices`` extension: concurrent requests are scored together and match direct scoring."""

    async def scenario() -> list[dict[str, object]]:
        teacher = LocalTeacher(engine, batch_wait_s=0.05)
        answers = await asyncio.gather(*(teacher.chat_completion({"messages": p, "label_choices": LABELS})
                                         for p in _prompts()))
        means = await asyncio.gather(*(teacher.chat_completion({"messages": p, "label_choices": LABELS,
                                                                 "label_score": "mean"}) for p in _prompts()))
        await teacher.aclose()
        return [*answers, *means]

    both = asyncio.run(scenario())
    answers, means = both[:3], both[3:]
    for answer, prompt in zip(means, _prompts(), strict=True):  # label_score "mean": length-normalised scores
        probs = answer["choices"][0]["label_probs"]  # type: ignore[index]
        direct = engine.score_labels_batch([prompt], LABELS, length_normalise=True)[0]
        assert all(abs(probs[k] - direct[k]) < 1e-4 for k in LABELS)
    for answer, prompt in zip(answers, _prompts(), strict=True):
        choice = answer["choices"][0]  # type: ignore[index]
        probs = choice["label_probs"]
        direct = engine.score_labels(prompt, LABELS)
        assert set(probs) == set(LABELS) and abs(sum(probs.values()) - 1) < 1e-6
        assert all(abs(probs[k] - direct[k]) < 1e-4 for k in LABELS)
        assert choice["message"]["content"] == max(direct, key=direct.__getitem__)
        assert answer["usage"]["prompt_tokens"] == len(engine.encode(prompt))  # type: ignore[index]
