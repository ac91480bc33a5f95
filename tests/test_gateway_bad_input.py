"""Bad input gets a clear 4xx with an OpenAI-shaped body, never a 500 (raw HTTP, plus hypothesis fuzzing)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _gateway_support import Running, running_gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    extra = {"upstreams": None, "models": {"fake-teacher*": "fake"}, "max_body_bytes": 64 * 1024}
    with running_gateway(tmp_path_factory.mktemp("gwbad"), extra_config=extra) as running:
        yield running


@pytest.fixture(scope="module")
def http(gw: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.base_url, headers=gw.headers(), timeout=10) as c:
        yield c


def assert_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code", "reasons"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def test_malformed_json_and_non_objects(http: httpx.Client) -> None:
    assert_error(http.post("/chat/completions", content=b'{"model": "fake-teacher",'), 400, "invalid_json")
    assert_error(http.post("/chat/completions", content=b"[1, 2]"), 400, "invalid_json")
    assert_error(http.post("/chat/completions", content=b""), 400, "invalid_json")


def test_invalid_utf8(http: httpx.Client) -> None:
    body = b'{"model": "fake-teacher", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    assert_error(http.post("/chat/completions", content=body), 400, "invalid_utf8")


@pytest.mark.parametrize(("patch", "param"), [
    ({"model": 3}, "model"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": {}, "content": None}]}, "messages[0].role"),  # found by schemathesis (was a 500)
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"n": 0}, "n"),
    ({"n": "2"}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": 9}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"1": "x"}}, "logit_bias"),
    ({"metadata": ["x"]}, "metadata"),
    ({"metadata": {"policy_user": 7}}, "metadata.policy_user"),
    ({"tools": {"x": 1}}, "tools"),
])
def test_wrong_types_name_the_field(http: httpx.Client, patch: dict, param: str) -> None:
    body = {"model": "fake-teacher", "messages": [{"role": "user", "content": "hi"}], **patch}
    assert_error(http.post("/chat/completions", json=body), 400, "invalid_request", param)


def test_unknown_model_is_404_and_prefix_routing_works(gw: Running, http: httpx.Client) -> None:
    body = {"model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(http.post("/chat/completions", json=body), 404, "model_not_found", "model")
    ok = http.post("/chat/completions", json={**body, "model": "other/fake-teacher"})
    assert ok.status_code == 200, ok.text
    assert gw.fake.requests[-1]["body"]["model"] == "fake-teacher"
    assert ok.json()["model"] == "other/fake-teacher"


def test_missing_identity_is_denied_and_logged(gw: Running) -> None:
    headers = {"Authorization": gw.headers()["Authorization"], "X-Policy-Project": "proj-a"}
    body = {"model": "fake-teacher", "messages": [{"role": "user", "content": "hi"}]}
    err = assert_error(httpx.post(gw.base_url + "/chat/completions", json=body, headers=headers), 400)
    assert err["reasons"] == ["IDENTITY_INCOMPLETE"]
    assert "policy_run_id" in err["message"] and "policy_output_type" in err["message"]
    assert gw.log()[-1]["decision"] == "deny"


def test_oversized_body_is_413(http: httpx.Client) -> None:
    body = {"model": "fake-teacher", "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_error(http.post("/chat/completions", json=body), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: the cap holds while reading
        yield b'{"model": "fake-teacher", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}]}'

    assert_error(http.post("/chat/completions", content=chunks()), 413, "request_too_large")


def test_wrong_method_and_route(http: httpx.Client) -> None:
    assert assert_error(http.get("/chat/completions"), 405)
    assert http.get("/chat/completions").headers["allow"] == "POST"
    assert http.delete("/models").headers["allow"] == "GET"
    assert_error(http.post("/v2/nothing"), 404)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["fake-teacher", "", "other/x"]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bad"]),
                                                "content": st.text(max_size=50) | json_values}), max_size=3)
    | json_values,
    "n": json_values, "max_tokens": json_values, "stream": json_values, "logprobs": json_values,
    "top_logprobs": json_values, "logit_bias": json_values, "metadata": json_values, "temperature": json_values,
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_fuzzed_bodies_never_500(http: httpx.Client, body: dict) -> None:
    resp = http.post("/chat/completions", content=json.dumps(body).encode())
    assert resp.status_code < 500 or resp.status_code in (502, 503, 504), resp.text
    if resp.status_code != 200 and "text/event-stream" not in resp.headers.get("content-type", ""):
        assert "error" in resp.json()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_fuzzed_bytes_never_500(http: httpx.Client, raw: bytes) -> None:
    resp = http.post("/chat/completions", content=raw)
    assert 400 <= resp.status_code < 500 and "error" in resp.json()


def test_models_list_follows_the_policy(gw: Running) -> None:
    """Two upstreams list the fake's models as fake/... and other/...; the policy approves only other/*."""
    listed = httpx.get(gw.base_url + "/models", headers=gw.headers()).json()["data"]
    ids = [m["id"] for m in listed]
    assert "other/fake-teacher" in ids and "other/fake-teacher-large" in ids
    assert "fake-teacher" in ids  # named in the models table and approved
    assert not [i for i in ids if i.startswith("fake/")]  # not approved by the policy


def test_schemathesis_finds_no_server_errors(gw: Running, tmp_path: Path) -> None:
    """Property-based run of schemathesis against /openapi.json: every documented check passes."""
    st = Path(sys.executable).with_name("st")
    args = [str(st), "run", gw.url + "/openapi.json", "--url", gw.url, "--max-examples", "25", "--checks", "all",
            "--seed", "1", "--no-color"]
    for k, v in gw.headers().items():
        args += ["-H", f"{k}: {v}"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its cache goes there
    assert res.returncode == 0, res.stdout[-4000:]


def test_parse_request_fills_every_field_by_name() -> None:
    # parse_request builds Inbound positionally (cheaper on every request): each field must land where it belongs
    import dataclasses

    from distillgate.gateway.parse import Inbound, parse_request

    body = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "n": 3, "max_tokens": 7,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
            "logit_bias": {"1": 1, "2": -1}, "metadata": {"policy_run_size": 9, "keep": "x"}}
    headers = {"x-policy-user": "u1", "x-policy-project": "p1", "x-policy-run": "r1", "x-policy-output-type": "o1"}
    inb = parse_request("chat", json.dumps(body).encode(), headers)
    got = {f.name: getattr(inb, f.name) for f in dataclasses.fields(Inbound)}
    assert got == {"route": "chat", "body": {**body, "metadata": {"keep": "x"}}, "model": "m1", "stream": True,
                   "n": 3, "max_tokens": 7, "prompt": "hello", "prompt_tokens": inb.prompt_tokens, "top_logprobs": 2,
                   "logit_bias_size": 2, "user": "u1", "project": "p1", "run": "r1", "output_type": "o1",
                   "include_usage": True, "run_size": 9}
    assert isinstance(inb.prompt_tokens, int) and inb.prompt_tokens > len(json.dumps(body)) // 2
