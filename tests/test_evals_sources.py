"""The OpenAI-compatible answer source against a real HTTP server on loopback."""

from __future__ import annotations

import math

import pytest

from _evals_support import FakeChatServer, lookup_answerer
from distillgate.errors import UpstreamError, UserError
from distillgate.evals.answers import run_source
from distillgate.evals.sources import AnswerSource, OpenAIChatSource
from distillgate.evals.suites import load_banking77

HEADERS = {"X-Policy-User": "alice", "X-Policy-Project": "distill-1", "X-Policy-Run": "run-7",
           "X-Policy-Output-Type": "evaluation"}


def test_generation_carries_identity_headers_usage_and_logprobs():
    with FakeChatServer(lambda model, msgs: "card arrival", logprob=-0.5) as server:
        source = OpenAIChatSource("fake-teacher", server.base_url, api_key="test-key", headers=HEADERS,
                                  request_logprobs=True)
        assert isinstance(source, AnswerSource)
        gen = source.generate([{"role": "user", "content": "where is my card"}], max_tokens=8)
        card = source.describe()
        source.close()
    assert gen.text == "card arrival"
    assert gen.completion_tokens == 2 and gen.prompt_tokens == 4
    assert gen.mean_logprob == pytest.approx(-0.5)
    assert gen.latency_s > 0
    assert gen.meta["x-policy-id"] == "test-policy"
    sent = server.requests[0]
    for key, value in HEADERS.items():
        assert sent["headers"][key.lower()] == value
    assert sent["body"]["model"] == "fake-teacher" and sent["body"]["max_tokens"] == 8
    assert sent["body"]["temperature"] == 0.0 and sent["body"]["logprobs"] is True
    assert card["parameter_count"] == 1_000_000


def test_a_suite_run_parses_labels_and_records_denials_as_unanswered():
    suite = load_banking77(sample=12, seed=3)
    table = {it.text: it.gold for it in suite.items}
    denied = suite.items[0].text
    table[suite.items[1].text] = "I think it is about " + suite.items[1].gold.replace("_", " ") + "."
    with FakeChatServer(lookup_answerer(table)) as server:
        source = OpenAIChatSource("fake-teacher", server.base_url, api_key="test-key")
        items = list(suite.items)  # the first item trips the fake policy
        items[0] = type(items[0])(items[0].item_id, denied + " DENY", items[0].gold, items[0].slices)
        suite2 = type(suite)(suite.name, suite.kind, items, suite.labels)
        answers = run_source(suite2, source, "teacher")
    assert answers[0].error == "HTTP 403 OUTPUT_TYPE_BLOCKED" and answers[0].label is None
    assert answers[0].meta["reasons"] == ["OUTPUT_TYPE_BLOCKED"]
    assert answers[1].label == suite.items[1].gold  # parsed out of a sentence
    assert all(a.label == it.gold for a, it in zip(answers[2:], suite.items[2:], strict=True))
    assert all(a.confidence is None for a in answers)  # no logprobs asked for
    system = server.requests[1]["body"]["messages"][0]["content"]
    assert "card_arrival" in system and "exactly one label" in system and "messages to a bank" not in system  # no domain in a default


def test_wrong_key_is_a_user_error_with_a_fix():
    with FakeChatServer(lambda m, x: "hi") as server:
        source = OpenAIChatSource("fake-teacher", server.base_url, api_key="nope")
        with pytest.raises(UserError, match="HTTP 401") as err:
            source.generate([{"role": "user", "content": "x"}], max_tokens=4)
    assert "API key" in str(err.value)


def test_unreachable_endpoint_is_an_upstream_error():
    source = OpenAIChatSource("m", "http://127.0.0.1:9/v1", retries=0, timeout_s=2)
    with pytest.raises(UpstreamError, match="did not answer") as err:
        source.generate([{"role": "user", "content": "x"}], max_tokens=4)
    assert "base URL" in str(err.value)


def test_confidence_from_logprobs_is_exp_of_the_mean():
    suite = load_banking77(sample=3, seed=1)
    with FakeChatServer(lambda m, x: "card_arrival", logprob=math.log(0.8)) as server:
        source = OpenAIChatSource("fake-teacher", server.base_url, api_key="test-key", request_logprobs=True)
        answers = run_source(suite, source, "student")
    assert all(a.confidence == pytest.approx(0.8) and a.confidence_kind == "mean_token_prob" for a in answers)
