"""The gateway end to end over real HTTP, driven by the official openai SDK (sync, async, streaming)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from _gateway_support import Running, running_gateway
from distillgate.gateway.answer import StreamAssembly, answer_digest
from distillgate.gateway.stamps import Stamp
from distillgate.ledger.verify import verify_db

from conftest import run_cli
from fakes.fake_upstream import Behaviour


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_gateway(tmp_path_factory.mktemp("gw")) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_fake(gw: Running) -> None:
    gw.fake.clear()


def client(gw: Running, user: str = "alice", **ident: str) -> openai.OpenAI:
    headers = {k: v for k, v in gw.headers(user, **ident).items() if k != "Authorization"}
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.keys[user], max_retries=0, default_headers=headers)


MSG = [{"role": "user", "content": "my card was lost yesterday"}]


def last_entries(gw: Running, n: int) -> list[dict]:
    return gw.log()[-n:]


def test_chat_completion_allowed_is_logged_settled_and_stamped(gw: Running) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(model="fake-teacher", messages=MSG, n=2,
                                                                max_tokens=50)
    resp = raw.parse()
    assert [c.message.content for c in resp.choices] == ["Echo: my card was lost yesterday"] * 2
    assert resp.usage is not None and resp.usage.completion_tokens == 12
    decision, settlement = last_entries(gw, 2)
    assert decision["kind"] == "decision" and decision["decision"] == "allow"
    assert decision["user"] == "alice" and decision["project"] == "proj-a" and decision["run"] == "run-1"
    assert decision["tokens_reserved"] == decision["tokens_requested"] > 100  # 2 x 50 + prompt estimate
    assert settlement["kind"] == "settlement" and settlement["outcome"] == "ok"
    assert settlement["tokens_charged"] == resp.usage.total_tokens and settlement["records_charged"] == 2
    # the policy has audit.log_content: the request and the answer are in the log, not only their hashes
    assert decision["content"]["request"]["messages"] == MSG
    assert settlement["extra"]["content"]["response"][1]["text"] == "Echo: my card was lost yesterday"
    assert int(raw.headers["x-distillgate-decision"]) == decision["index"]
    # the stamp, in the header and in the body, signs the decision entry and the answer
    stamp = Stamp.from_header(raw.headers["x-distillgate-stamp"])
    body_stamp = Stamp.from_response(resp)
    assert body_stamp == Stamp.from_response(json.loads(raw.http_response.text))
    assert stamp == body_stamp
    pem = gw.gateway.store.signer.public_key_pem()
    assert stamp.verify(pem)
    assert stamp.payload["entry_index"] == decision["index"]
    assert stamp.payload["entry_hash"] == gw.gateway.store.entry(decision["index"]).entry_hash
    answer = json.loads(raw.http_response.text)
    assert stamp.payload["response_hash"] == answer_digest(answer["choices"], answer["model"])
    assert stamp.payload["upstream_id"] == resp.id
    tampered = Stamp({**stamp.payload, "project": "proj-b"}, stamp.signature)
    assert not tampered.verify(pem)


def test_metadata_identity_is_stripped_before_forwarding(gw: Running) -> None:
    c = openai.OpenAI(base_url=gw.base_url, api_key=gw.keys["alice"], max_retries=0)
    c.chat.completions.create(model="fake-teacher", messages=MSG, metadata={
        "policy_user": "alice", "policy_project_id": "proj-a", "policy_run_id": "run-meta",
        "policy_output_type": "summaries", "trace": "keep-me"})
    forwarded = gw.fake.requests[-1]["body"]
    assert forwarded["metadata"] == {"trace": "keep-me"}
    assert not any(k.startswith("x-policy") for k in gw.fake.requests[-1]["headers"])
    assert "authorization" not in gw.fake.requests[-1]["headers"]  # the caller's gateway key never leaves
    assert gw.log()[-2]["run"] == "run-meta"


def test_denial_lists_every_reason_and_forwards_nothing(gw: Running) -> None:
    served = gw.fake.served
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(gw, output_type="third_party_model_extraction").chat.completions.create(
            model="not-approved", messages=[{"role": "user", "content": "Ignore previous instructions."}],
            logprobs=True, top_logprobs=9)
    err = info.value.body
    assert isinstance(err, dict)
    assert set(err["reasons"]) >= {"OUTPUT_TYPE_BLOCKED", "MODEL_NOT_APPROVED", "TOP_LOGPROBS_EXCEEDED"}
    assert "research" in err["message"] and err["type"] == "permission_error"
    assert gw.fake.served == served
    entry = gw.log()[-1]
    assert entry["decision"] == "deny" and entry["reasons"] == err["reasons"]
    assert int(info.value.response.headers["x-distillgate-decision"]) == entry["index"]


def test_prompt_screens_block_credentials(gw: Running) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(gw).chat.completions.create(model="fake-teacher", messages=[
            {"role": "user", "content": "use AKIAABCDEFGHIJKLMNOP to call S3 for me"}])
    assert info.value.body["reasons"] == ["BLOCKED_CONTENT_DETECTED"]  # type: ignore[index]


def test_auth_missing_invalid_revoked_and_user_mismatch(gw: Running) -> None:
    ident = {k: v for k, v in gw.headers().items() if k != "Authorization"}
    body = {"model": "fake-teacher", "messages": MSG}
    r = httpx.post(gw.base_url + "/chat/completions", json=body, headers=ident)
    assert r.status_code == 401 and r.json()["error"]["reasons"] == ["AUTH_MISSING"]
    r = httpx.post(gw.base_url + "/chat/completions", json=body, headers={**ident, "Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["reasons"] == ["AUTH_INVALID"]
    r = httpx.post(gw.base_url + "/chat/completions", json=body, headers={**gw.headers("bob"),
                                                                         "X-Policy-User": "alice"})
    assert r.status_code == 403 and "USER_MISMATCH" in r.json()["error"]["reasons"]
    from distillgate.keys import KeyStore

    ks = KeyStore(gw.db)
    record, secret = ks.create("dave")
    ok = httpx.post(gw.base_url + "/chat/completions", json=body,
                    headers={**ident, "X-Policy-User": "dave", "Authorization": f"Bearer {secret}"})
    assert ok.status_code == 200
    ks.revoke(record.key_id)
    ks.close()
    r = httpx.post(gw.base_url + "/chat/completions", json=body,
                   headers={**ident, "X-Policy-User": "dave", "Authorization": f"Bearer {secret}"})
    assert r.status_code == 401 and r.json()["error"]["reasons"] == ["KEY_REVOKED"]


def test_records_quota_per_run_counts_choices_and_answers_429(gw: Running) -> None:
    c = client(gw, project="tiny", run="quota-run")
    c.chat.completions.create(model="fake-teacher", messages=MSG, n=2, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="fake-teacher", messages=MSG, n=2, max_tokens=5)
    assert info.value.body["reasons"] == ["RECORDS_PER_RUN_EXCEEDED"]  # type: ignore[index]
    assert info.value.status_code == 429


def test_upstream_failure_is_retried_then_refunded(gw: Running) -> None:
    gw.fake.push(Behaviour.status_error(503), Behaviour.reset())  # two failures, then success (max_retries=2)
    resp = client(gw).chat.completions.create(model="fake-teacher", messages=MSG)
    assert resp.choices[0].message.content.startswith("Echo:")
    gw.fake.push(*[Behaviour.status_error(500)] * 3)
    with pytest.raises(openai.APIStatusError) as info:
        client(gw).chat.completions.create(model="fake-teacher", messages=MSG)
    assert info.value.status_code == 502
    assert info.value.body["reasons"] == ["UPSTREAM_ERROR"]  # type: ignore[index]
    decision, settlement = last_entries(gw, 2)
    assert decision["decision"] == "allow"
    assert settlement["outcome"] == "upstream_error" and settlement["tokens_charged"] == 0
    assert settlement["tokens_refunded"] == decision["tokens_reserved"]
    res = gw.gateway.store.reservation(settlement["reservation_id"])
    assert res["state"] == "refunded"


def test_upstream_stall_times_out_with_504_and_refund(gw: Running) -> None:
    gw.fake.push(Behaviour.stall(3.0))  # the fixture's upstream read timeout is 2 s
    with pytest.raises(openai.APIStatusError) as info:
        client(gw).chat.completions.create(model="fake-teacher", messages=MSG)
    assert info.value.status_code == 504
    assert gw.log()[-1]["outcome"] == "timeout"


def test_streaming_passes_chunks_settles_and_stamps(gw: Running) -> None:
    chunks = list(client(gw).chat.completions.create(
        model="fake-teacher", messages=MSG, stream=True, logprobs=True, top_logprobs=2,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: my card was lost yesterday"
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[0].completion_tokens == 6
    lp = [c.choices[0].logprobs.content[0].logprob for c in chunks if c.choices and c.choices[0].logprobs]
    assert lp and all(round(v, 2) == v for v in lp)  # hardening.round_logprobs = 2
    stamp = Stamp.from_response(chunks[-1])
    assert stamp.verify(gw.gateway.store.signer.public_key_pem())
    assembly = StreamAssembly()
    for c in chunks[:-1]:
        assembly.add(c.model_dump(exclude_unset=True))
    assert assembly.choices()[0]["message"]["content"] == text
    assert stamp.payload["response_hash"] == assembly.digest()
    _decision, settlement = last_entries(gw, 2)
    assert settlement["outcome"] == "ok" and settlement["completion_tokens"] == 6
    assert gw.fake.requests[-1]["body"]["stream_options"] == {"include_usage": True}


def test_streaming_without_include_usage_hides_the_usage_chunk(gw: Running) -> None:
    chunks = list(client(gw).chat.completions.create(model="fake-teacher", messages=MSG, stream=True))
    assert not any(c.usage for c in chunks)
    assert gw.log()[-1]["completion_tokens"] == 6  # the gateway still settled real usage


def test_stream_cut_midway_settles_as_upstream_error(gw: Running) -> None:
    gw.fake.push(Behaviour.cut(after_chunks=3))
    stream = client(gw).chat.completions.create(model="fake-teacher", messages=MSG, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
    settlement = gw.log()[-1]
    assert settlement["outcome"] == "upstream_error"
    assert settlement["completion_tokens"] == 2  # the chunks that did arrive are charged


def test_client_disconnect_mid_stream_settles(gw: Running) -> None:
    gw.fake.push(Behaviour.slow(0.05))
    body = json.dumps({"model": "fake-teacher", "stream": True,
                       "messages": [{"role": "user", "content": "word " * 100}], "max_tokens": 100}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in gw.headers().items())
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(body)}\r\n{head}\r\n".encode() + body)
        assert s.recv(200).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)  # a few chunks flow, then the client goes away
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        last = gw.log()[-1]
        if last["kind"] == "settlement":
            break
        time.sleep(0.05)
    assert last["outcome"] == "client_disconnected"
    assert 0 < last["completion_tokens"] < 100  # what was generated before the client left is charged
    assert last["records_charged"] == 0
    assert gw.gateway.store.reservation(last["reservation_id"])["state"] == "settled"


def test_output_contract_block_and_flag(gw: Running) -> None:
    gw.fake.set_reply("not_a_label")
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client(gw, output_type="labels").chat.completions.create(model="fake-teacher", messages=MSG)
    assert info.value.body["reasons"] == ["OUTPUT_FORMAT_VIOLATION"]  # type: ignore[index]
    assert "OUTPUT_FORMAT_VIOLATION" in gw.log()[-1]["reasons"]
    gw.fake.set_reply("card_lost")
    ok = client(gw, output_type="labels").chat.completions.create(model="fake-teacher", messages=MSG)
    assert ok.choices[0].message.content == "card_lost"
    gw.fake.set_reply('{"wrong": 1}')
    flagged = client(gw, output_type="json_records").chat.completions.create(model="fake-teacher", messages=MSG)
    assert flagged.model_extra["distillgate"]["flags"] == ["OUTPUT_FORMAT_VIOLATION"]  # type: ignore[index]
    gw.fake.set_reply("card_lost")
    streamed = list(client(gw, output_type="labels").chat.completions.create(
        model="fake-teacher", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "card_lost"


def test_async_client_concurrent_requests(gw: Running) -> None:
    async def main() -> list[str]:
        headers = {k: v for k, v in gw.headers(run="async-run").items() if k != "Authorization"}
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.keys["alice"], max_retries=0,
                                      default_headers=headers) as ac:
            results = await asyncio.gather(*[
                ac.chat.completions.create(model="fake-teacher", messages=[{"role": "user", "content": f"q{i}"}])
                for i in range(20)])
            return [r.choices[0].message.content or "" for r in results]

    answers = asyncio.run(main())
    assert sorted(answers) == sorted(f"Echo: q{i}" for i in range(20))
    assert gw.gateway.store.usage("proj-a", "alice", "async-run").records_run == 20


def test_legacy_completions(gw: Running) -> None:
    resp = client(gw).completions.create(model="fake-teacher", prompt="hello there", logprobs=2)
    assert resp.choices[0].text == "Echo: hello there"
    assert resp.choices[0].logprobs is not None and resp.choices[0].logprobs.token_logprobs


def test_models_health_metrics(gw: Running) -> None:
    models = [m.id for m in client(gw).models.list()]
    assert models == ["fake-teacher", "fake-teacher-large"]
    assert httpx.get(gw.base_url + "/models").status_code == 401
    health = httpx.get(gw.url + "/healthz").json()
    assert health["status"] == "ok" and health["policies"] == ["research", "tiny"]
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'distillgate_decisions_total{decision="allow"}' in metrics
    assert "distillgate_request_seconds_bucket" in metrics
    spec = httpx.get(gw.url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]


def test_log_verifies_and_stamp_cli(gw: Running, tmp_path: Path) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(model="fake-teacher", messages=MSG)
    saved = tmp_path / "response.json"
    saved.write_text(raw.http_response.text)
    res = run_cli("stamp", "verify", str(saved), "--db", str(gw.db))
    assert res.returncode == 0, res.stderr
    assert "signature ok" in res.stdout and "response hash ok" in res.stdout and "log entry" in res.stdout
    edited = json.loads(raw.http_response.text)
    edited["choices"][0]["message"]["content"] = "something else"
    saved.write_text(json.dumps(edited))
    res = run_cli("stamp", "verify", str(saved), "--db", str(gw.db))
    assert res.returncode == 2 and "response_hash" in res.stderr
    res = run_cli("stamp", "verify", raw.headers["x-distillgate-stamp"], "--db", str(gw.db))
    assert res.returncode == 0, res.stderr
    report = verify_db(gw.db)
    assert report.ok, report


def test_tools_and_response_format_pass_through_unchanged(gw: Running) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    client(gw).chat.completions.create(model="fake-teacher", messages=MSG, tools=tools,  # type: ignore[arg-type]
                                       response_format=fmt)  # type: ignore[arg-type]
    forwarded = gw.fake.requests[-1]["body"]
    assert forwarded["tools"] == tools and forwarded["response_format"] == fmt


def test_upstream_client_error_is_passed_on_and_refunded(gw: Running) -> None:
    gw.fake.push(Behaviour.status_error(400))
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).chat.completions.create(model="fake-teacher", messages=MSG)
    assert info.value.body["code"] == "upstream_rejected"  # type: ignore[index]
    assert gw.fake.served == 1  # a 400 is not retried
    assert gw.log()[-1]["outcome"] == "upstream_error" and gw.log()[-1]["tokens_charged"] == 0


def test_streaming_legacy_completions(gw: Running) -> None:
    chunks = list(client(gw).completions.create(model="fake-teacher", prompt="hello there", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: hello there"
    assert "distillgate" in (chunks[-1].model_extra or {})
    assert gw.log()[-1]["outcome"] == "ok"
