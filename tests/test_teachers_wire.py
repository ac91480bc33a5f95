"""Fast tests of the teacher plumbing that need no model: specs, request parsing, prefix/trie logic, batching."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from distillgate.errors import NotFoundError, UpstreamError, UserError
from distillgate.teachers import wire
from distillgate.teachers.base import TeacherCard
from distillgate.teachers.engine import Generation, SamplingParams, _Trie, common_prefix_length
from distillgate.teachers.loading import DEFAULT_MODEL, resolve_spec
from distillgate.teachers.local import LocalTeacher


def test_default_spec_resolves_to_the_packaged_gguf() -> None:
    source = resolve_spec(DEFAULT_MODEL)
    assert source.kind == "gguf"
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.is_file()


def test_spec_paths_and_errors(tmp_path: Path) -> None:
    gguf = tmp_path / "Tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_spec(str(gguf)).model_name == "local/tiny.q8_0"
    assert resolve_spec(f"local/{gguf}").kind == "gguf"
    model_dir = tmp_path / "MyModel"
    model_dir.mkdir()
    with pytest.raises(NotFoundError, match=r"no config\.json"):
        resolve_spec(str(model_dir))
    (model_dir / "config.json").write_text("{}")
    assert resolve_spec(str(model_dir)).kind == "hf_dir"
    with pytest.raises(NotFoundError, match="unknown local teacher") as info:
        resolve_spec("local/no-such-model")
    assert "hint" in str(info.value)


def test_parse_chat_reads_openai_fields() -> None:
    req = wire.parse_chat({
        "model": "local/smollm2-135m-instruct",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "temperature": 0.7, "top_p": 0.9, "seed": 5, "max_completion_tokens": 12, "stop": "\n", "n": 3,
        "logprobs": True, "top_logprobs": 20, "stream": True, "metadata": {"x": 1},
    })
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert req.params == SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, seed=5, stop=("\n",),
                                        logprobs=True, top_logprobs=20)
    assert req.n == 3 and req.stream is True
    assert wire.choice_params(req.params, 2).seed == 7


def test_parse_chat_reports_every_problem_with_status_400() -> None:
    with pytest.raises(UpstreamError) as info:
        wire.parse_chat({"messages": [{"role": "robot", "content": "x"}], "temperature": 3, "top_p": 0,
                         "top_logprobs": 21, "logprobs": True, "n": 0, "stop": ["a", "b", "c", "d", "e"],
                         "tools": [{}], "max_tokens": "ten"})
    err = info.value
    assert err.status == 400
    for fragment in ("messages[0] needs a role", "temperature must be in [0, 2]", "top_p must be in (0, 1]",
                     "top_logprobs must be in [0, 20]", "n must be in [1, 16]", "stop takes at most 4",
                     "tools is not supported", "max_tokens must be an integer"):
        assert fragment in err.message
    with pytest.raises(UpstreamError, match="messages must be a non-empty list"):
        wire.parse_chat({})
    with pytest.raises(UpstreamError, match="top_logprobs needs logprobs"):
        wire.parse_chat({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})


def test_parse_completion() -> None:
    req = wire.parse_completion({"prompt": ["a", "b"], "max_tokens": 3, "logprobs": 2, "n": 2, "echo": True})
    assert req.prompts == ["a", "b"] and req.n == 2 and req.echo
    assert req.params.logprobs and req.params.top_logprobs == 2 and req.params.max_tokens == 3
    with pytest.raises(UpstreamError, match="prompt must be"):
        wire.parse_completion({"prompt": 3})


def test_sampling_params_check() -> None:
    with pytest.raises(UserError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0).check()
    SamplingParams(temperature=0.0, top_logprobs=20).check()


def test_common_prefix_leaves_each_row_a_token() -> None:
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix_length([[7, 8], [9]]) == 0


def test_trie_shares_prefixes_and_sums_paths() -> None:
    trie = _Trie.build([[5, 6, 2], [5, 7, 2], [8, 2]])
    assert trie.tokens == [5, 8, 6, 7, 2, 2, 2]
    assert trie.parents == [-1, -1, 0, 0, 1, 2, 3]
    assert trie.inner == [0, 1, 2, 3]
    node_lp = torch.tensor([-1.0, -2.0, -0.5, -0.25, -0.1, -0.2, -0.3])
    sums = node_lp @ trie.path_matrix().float().T
    assert torch.allclose(sums, torch.tensor([-1.7, -1.55, -2.1]))
    mask = trie.ancestor_mask()
    assert mask[5].tolist() == [True, False, True, False, False, True, False]
    with pytest.raises(UserError, match="same tokens"):
        _Trie.build([[1, 2], [1, 2]])


class FakeEngine:
    """Stands in for LocalModel: echoes prompts, records batch sizes, streams word by word."""

    model_name = "local/fake"

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()

    def card(self) -> TeacherCard:
        return TeacherCard(model_id="local/fake", backend="fake", file_sha256="ab" * 32)

    def generate(self, prompts, params, *, prefix_cache=True, on_delta=None):  # type: ignore[no-untyped-def]
        self.gate.wait(5)
        self.batches.append(len(prompts))
        out = []
        for row, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            if "boom" in text:
                raise UserError("prompt has too many tokens", hint="shorten it")
            words = text.split(" ")[: p.max_tokens]
            for k, w in enumerate(words):
                if on_delta is not None:
                    on_delta(row, w if k == 0 else " " + w)
            out.append(Generation(" ".join(words), list(range(len(words))), "stop", 4))
        return out


def _body(text: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    async def scenario() -> tuple[list[dict[str, object]], list[int]]:
        engine = FakeEngine()
        teacher = LocalTeacher(engine, max_batch=8, batch_wait_s=0.2)  # type: ignore[arg-type]
        tasks = [asyncio.create_task(teacher.chat_completion(_body(f"q{i} a b", n=1))) for i in range(6)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        answers = await asyncio.gather(*tasks)
        await teacher.aclose()
        return answers, engine.batches

    answers, batches = asyncio.run(scenario())
    assert [a["choices"][0]["message"]["content"] for a in answers] == [f"q{i} a b" for i in range(6)]  # type: ignore[index]
    assert sum(batches) == 6 and max(batches) > 1
    assert answers[0]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert answers[0]["system_fingerprint"] == "dg-" + "ab" * 6


def test_a_bad_request_fails_alone_with_400() -> None:
    async def scenario() -> tuple[object, object]:
        engine = FakeEngine()
        teacher = LocalTeacher(engine, max_batch=8, batch_wait_s=0.2)  # type: ignore[arg-type]
        good = asyncio.create_task(teacher.chat_completion(_body("fine words")))
        bad = asyncio.create_task(teacher.chat_completion(_body("boom")))
        await asyncio.sleep(0.05)
        engine.gate.set()
        results = await asyncio.gather(good, bad, return_exceptions=True)
        await teacher.aclose()
        return results[0], results[1]

    good, bad = asyncio.run(scenario())
    assert isinstance(good, dict) and good["choices"][0]["message"]["content"] == "fine words"
    assert isinstance(bad, UpstreamError) and bad.status == 400 and "too many tokens" in bad.message


def test_stream_yields_role_deltas_finish_and_usage() -> None:
    async def scenario() -> list[dict[str, object]]:
        engine = FakeEngine()
        engine.gate.set()
        teacher = LocalTeacher(engine)  # type: ignore[arg-type]
        chunks = [c async for c in teacher.stream_chat_completion(_body("one two three", n=2))]
        await teacher.aclose()
        return chunks

    chunks = asyncio.run(scenario())
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks[1:-1]:
        for choice in c["choices"]:  # type: ignore[attr-defined]
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "one two three", 1: "one two three"}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6  # type: ignore[index]


def test_closed_teacher_refuses_with_503() -> None:
    async def scenario() -> None:
        teacher = LocalTeacher(FakeEngine())  # type: ignore[arg-type]
        await teacher.aclose()
        await teacher.chat_completion(_body("x"))

    with pytest.raises(UpstreamError) as info:
        asyncio.run(scenario())
    assert info.value.status == 503


def test_label_choices_are_validated() -> None:
    import pytest

    from distillgate.errors import UpstreamError
    from distillgate.teachers.wire import label_response, parse_label_choices, parse_label_score

    assert parse_label_choices(["a", "b"]) == ["a", "b"]
    assert (parse_label_score(None), parse_label_score("sum"), parse_label_score("mean")) == (False, False, True)
    for bad_score in ("max", 1, True):
        with pytest.raises(UpstreamError, match="label_score must be one of sum, mean"):
            parse_label_score(bad_score)
    for bad in ([], ["a", "a"], ["a", ""], "a", [1, 2]):
        with pytest.raises(UpstreamError) as info:
            parse_label_choices(bad)
        assert info.value.status == 400
    out = label_response("m", "fp", {"a": 0.25, "b": 0.75}, prompt_tokens=10, completion_tokens=1)
    assert out["choices"][0]["message"]["content"] == "b" and out["usage"]["total_tokens"] == 11
