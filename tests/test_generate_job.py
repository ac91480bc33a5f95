"""The generation job against a real gateway (uvicorn, loopback) in front of the fake teacher, over HTTP."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from _gateway_support import running_gateway
from _generate_support import decisions, make_dataset, stored_rows
from distillgate.data.generate import (
    GatewayTarget,
    GenerateSettings,
    PromptTemplate,
    generate,
    parse_settings,
)
from distillgate.data.store import WorkingCopy
from distillgate.errors import ConfigError, UserError
from distillgate.gateway.stamps import Stamp

from fakes.fake_upstream import Behaviour

TEMPLATE = PromptTemplate(id="intent-v1", system="You label banking messages.",
                          user="Message: {input}\nAnswer with one intent.")


def settings(**over: object) -> GenerateSettings:
    base: dict[str, object] = {"model": "fake-teacher", "user": "alice", "project": "proj-a", "run": "gen-1",
                               "output_type": "summaries", "concurrency": 4, "backoff_s": 0.01}
    return parse_settings({**base, **over})


def test_k3_rows_carry_stamps_sampling_and_logprobs(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 6)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        progress: list[tuple[int, int]] = []
        report = generate(wc, TEMPLATE, settings(k=3, temperature=0.7, max_tokens=32, top_logprobs=2),
                          target, on_progress=lambda rows, tokens: progress.append((rows, tokens)))
        pem = gw.gateway.store.signer.public_key_pem()
        log = gw.log()
        sent = gw.fake.requests
    assert (report.added, report.already_present, report.failed, report.denied) == (18, 0, 0, 0)
    assert report.tokens == sum(t for _, t in progress) > 0
    assert len(progress) == 18
    rows = stored_rows(root)
    assert sorted(r["row_id"] for r in rows) == sorted(f"traffic-m{i}:{s}" for i in range(6) for s in range(3))
    for r in rows:
        # the fake teacher echoes the rendered user message, so the prompt reached it through the gateway
        assert r["output_raw"].startswith("Echo: Message:")
        assert r["prompt_template_id"] == "intent-v1" and r["prompt_template_sha256"] == TEMPLATE.sha256
        assert r["sampling"]["seed"] == r["sample_index"] and r["sampling"]["temperature"] == 0.7
        assert r["sampling"]["max_tokens"] == 32 and r["sampling"]["top_logprobs"] == 2
        assert r["teacher_model"] == "fake-teacher" and r["teacher_card"]["model_id"] == "fake-teacher"
        assert r["top_logprobs"] and all(len(step) == 2 for step in r["top_logprobs"])
        stamp = Stamp.from_dict(r["stamp"])
        assert stamp.verify(pem)
        assert stamp.payload["run"] == "gen-1" and stamp.payload["project"] == "proj-a"
        # response_hash covers the whole answer (content, logprobs, model, ...): tests/adversarial/test_stamps.py
        assert len(stamp.payload["response_hash"]) == 64
    assert len({r["stamp"]["entry_index"] for r in rows}) == 18  # one decision per row
    assert len(decisions(log, "gen-1")) == 18
    # the job declares its run size (6 inputs x k=3) so the extraction monitor's volume signal has a basis
    assert {d["extra"]["extraction"]["features"]["declared_run_size"] for d in decisions(log, "gen-1")} == {18}
    bodies = [q["body"] for q in sent]
    assert sorted(b["seed"] for b in bodies) == [0] * 6 + [1] * 6 + [2] * 6
    assert all(b["n"] == 1 and b["messages"][0]["role"] == "system" for b in bodies)
    assert all(q["headers"].get("authorization", "") != f"Bearer {gw.keys['alice']}" for q in sent)


def test_rerun_adds_nothing_and_asks_nothing(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 4)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        first = generate(wc, TEMPLATE, settings(k=2), target)
        served = gw.fake.served
        second = generate(wc, TEMPLATE, settings(k=2), target)
        more = generate(wc, TEMPLATE, settings(k=3), target)  # one more sample per input: only those are asked
        assert gw.fake.served == served + 4
    assert (first.added, second.added, second.already_present) == (8, 0, 8)
    assert (more.added, more.already_present) == (4, 8)


def test_quota_stop_keeps_rows_and_reports_reason(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 6)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        report = generate(wc, TEMPLATE, settings(project="tiny", run="tiny-1", concurrency=1), target)
        log = gw.log()
    assert report.stopped and report.quota_stop
    assert report.stop_status == 429 and report.stopped_by == ["RECORDS_PER_RUN_EXCEEDED"]
    assert report.added == 3 and report.denied == 1 and report.retried == 0  # a denial is never retried
    assert len(stored_rows(root)) == 3
    assert len(decisions(log, "tiny-1")) == 3 and len(decisions(log, "tiny-1", "deny")) == 1


def test_policy_denial_stops_without_retry(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 3)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        report = generate(wc, TEMPLATE, settings(output_type="third_party_model_extraction", concurrency=1), target)
        assert gw.fake.served == 0
    assert report.stop_status == 403 and "OUTPUT_TYPE_BLOCKED" in report.stopped_by
    assert report.added == 0 and report.retried == 0 and not report.quota_stop


def test_upstream_failures_are_retried(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 4)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        # the gateway itself tries 3 times (max_retries 2): 3 x 503 make it answer 5xx; then a reset, then ok
        gw.fake.push(*[Behaviour.status_error(503)] * 3, Behaviour.reset(), *[Behaviour.status_error(502)] * 3)
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        report = generate(wc, TEMPLATE, settings(k=2, concurrency=1), target)
        log = gw.log()
    assert report.added == 8 and report.failed == 0 and report.retried >= 2
    outcomes = [e["outcome"] for e in log if e["kind"] == "settlement"]
    assert outcomes.count("ok") == 8 and outcomes.count("upstream_error") >= 2


def test_gives_up_after_max_attempts_and_rerun_finishes(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 2)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        gw.fake.push(*[Behaviour.status_error(500)] * 6)  # 2 client attempts x 3 gateway tries: one row fails
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        report = generate(wc, TEMPLATE, settings(concurrency=1, max_attempts=2), target)
        assert report.failed == 1 and report.added == 1 and "gave up after 2 attempts" in report.failures[0]
        again = generate(wc, TEMPLATE, settings(concurrency=1, max_attempts=2), target)
    assert again.added == 1 and again.already_present == 1


class FixedScorer:
    async def score(self, messages: Sequence[Mapping[str, str]], labels: Sequence[str]) -> dict[str, float] | None:
        return {label: 1.0 / len(labels) for label in labels}


def test_labels_fill_template_and_scorer_hook(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 2)
    tpl = PromptTemplate(id="labels", user="Pick one of {labels} for: {input}")
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        generate(wc, tpl, settings(labels=["card_arrival", "lost_or_stolen_card"]), target, label_scorer=FixedScorer())
    rows = stored_rows(root)
    assert all(r["label_probs"] == {"card_arrival": 0.5, "lost_or_stolen_card": 0.5} for r in rows)
    assert all("card_arrival, lost_or_stolen_card" in r["output_raw"] for r in rows)


def test_bad_templates_and_settings_are_rejected(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 1)
    target = GatewayTarget("http://127.0.0.1:9/v1", "k")
    with WorkingCopy.open(root) as wc:
        with pytest.raises(UserError, match="unknown field"):
            generate(wc, PromptTemplate(id="t", user="{input} {account}"), settings(), target)
        with pytest.raises(UserError, match=r"does not contain \{input\}"):
            generate(wc, PromptTemplate(id="t", user="hello"), settings(), target)
        with pytest.raises(UserError, match="labels"):
            generate(wc, PromptTemplate(id="t", user="{input} {labels}"), settings(), target)
    with pytest.raises(ConfigError) as info:
        parse_settings({"model": "m", "user": "u", "project": "p", "run": "r", "output_type": "o", "k": 0,
                        "temprature": 1})
    assert {i.path for i in info.value.issues} == {"k", "temprature"}
    assert PromptTemplate(id="a", user="{input}").sha256 != PromptTemplate(id="a", user="{input}", system="s").sha256


def test_client_timeouts_are_retried(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 2)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        gw.fake.push(Behaviour.stall(1.5))  # longer than the client's timeout, shorter than the gateway's
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        report = generate(wc, TEMPLATE, settings(concurrency=1, timeout_s=0.5), target)
    assert report.added == 2 and report.failed == 0 and report.retried == 1


def test_one_job_per_working_copy(tmp_path: Path) -> None:
    from distillgate.data.generate import job_lock

    root = make_dataset(tmp_path, 1)
    busy = f"another generation job \\(pid {os.getpid()}\\)"
    with WorkingCopy.open(root) as wc, job_lock(root), pytest.raises(UserError, match=busy):
        generate(wc, TEMPLATE, settings(), GatewayTarget("http://127.0.0.1:9/v1", "k"))
    with job_lock(root):  # released when the holder leaves
        pass


def test_token_quota_stop(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 4)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        report = generate(wc, TEMPLATE, settings(project="tiny", run="tok", concurrency=1, max_tokens=150), target)
    assert report.stop_status == 429 and report.stopped_by == ["TOKENS_PER_DAY_EXCEEDED"] and report.quota_stop
    assert report.added >= 1 and len(stored_rows(root)) == report.added


def test_contract_violation_fails_the_row_not_the_job(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 3)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        # output type "labels" has a blocking contract (card_lost | top_up_failed); the fake echoes the prompt
        report = generate(wc, TEMPLATE, settings(output_type="labels", concurrency=1), target)
        assert (report.failed, report.added, report.stopped) == (3, 0, False)
        assert "422 OUTPUT_FORMAT_VIOLATION" in report.failures[0]
        gw.fake.set_reply("card_lost")
        fixed = generate(wc, TEMPLATE, settings(output_type="labels", concurrency=1), target)
    assert fixed.added == 3 and {r["output_raw"] for r in stored_rows(root)} == {"card_lost"}


def test_label_scoring_sends_label_choices_and_stores_label_probs(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 3)
    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        report = generate(wc, TEMPLATE, settings(labels=labels, label_scoring=True, max_tokens=8), target)
        sent = [r["body"] for r in gw.fake.requests if r["path"].endswith("/chat/completions")]
    assert report.added == 3
    assert all(body["label_choices"] == labels and "logprobs" not in body for body in sent)
    for row in stored_rows(root):
        probs = row["label_probs"]
        assert set(probs) == set(labels) and abs(sum(probs.values()) - 1) < 1e-9
        assert row["output_raw"] == max(probs, key=probs.__getitem__)  # the answer is the most probable label
        assert row["sampling"]["label_scoring"] is True and row["stamp"]


def test_label_scoring_mean_asks_for_length_normalised_scores(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 2)
    labels = ["card_arrival", "exchange_rate"]
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        report = generate(wc, TEMPLATE, settings(labels=labels, label_scoring="mean", max_tokens=8), target)
        sent = [r["body"] for r in gw.fake.requests if r["path"].endswith("/chat/completions")]
    assert report.added == 2
    assert all(body["label_choices"] == labels and body["label_score"] == "mean" for body in sent)
    assert all(row["sampling"]["label_scoring"] == "mean" for row in stored_rows(root))
    with pytest.raises(UserError):
        settings(labels=labels, label_scoring="max")
