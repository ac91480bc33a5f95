"""Requests: model names that are paths, duplicated identity headers, oversized headers, half-sent bodies."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from _adversarial import Target, raw_request, serve_target

MSG = [{"role": "user", "content": "hi"}]

@pytest.fixture()
def target(tmp_path: Path) -> Iterator[Target]:
    with serve_target(tmp_path) as t:
        yield t



def _error(resp: httpx.Response) -> dict[str, object]:
    error: dict[str, object] = resp.json()["error"]
    return error


def test_local_model_names_come_from_the_registry_never_from_a_path(target: Target, tmp_path: Path) -> None:
    existing = tmp_path / "model-dir"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    answers = {}
    for name in ("local/~", "local/../x", f"local/{existing}", f"local/{tmp_path / 'missing-dir'}",
                 "local/nope.gguf"):
        resp = target.chat({"model": name, "messages": MSG})
        answers[name] = (resp.status_code, _error(resp)["code"], str(_error(resp)["message"]).replace(name, "NAME"))
    assert len(set(answers.values())) == 1, answers  # one answer, whatever is on the disk
    status, code, message = next(iter(answers.values()))
    assert status == 404 and code == "model_not_found" and "local_models" in message
    assert not target.entries("decision")  # refused before admission: nothing loaded, nothing reserved


@pytest.mark.parametrize("name", ["local/smollm2-135m-instruct  ", " fake-teacher", "fake-teacher\t",
                                  "fake\x00teacher"])
def test_model_names_are_canonical(target: Target, name: str) -> None:
    resp = target.chat({"model": name, "messages": MSG})
    assert resp.status_code == 400 and _error(resp)["code"] == "invalid_model"
    assert not target.entries("decision")


@pytest.mark.parametrize("header", ["X-Policy-Project", "X-Policy-User", "Authorization"])
def test_a_duplicated_identity_header_is_refused(target: Target, header: str) -> None:
    headers = [(k, v) for k, v in target.headers().items()]
    value = dict(headers)[header]
    headers.append((header, value if header == "Authorization" else "other"))
    resp = httpx.post(target.url + "/v1/chat/completions", json={"model": "fake-teacher", "messages": MSG},
                      headers=headers, timeout=10)
    assert resp.status_code == 400 and _error(resp)["code"] == "duplicate_header"
    assert header.lower() in str(_error(resp)["message"])
    assert target.fake.served == 0


def test_oversized_request_headers_get_431(target: Target) -> None:
    before = len(target.entries())
    resp = httpx.post(target.url + "/v1/chat/completions", json={"model": "fake-teacher", "messages": MSG},
                      headers={"X-Padding": "a" * 200_000}, timeout=10)
    assert resp.status_code == 431
    assert len(target.entries()) == before  # an unauthenticated flood grows nothing


def _half_sent(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{\"model\":")
    return s


def test_a_half_sent_body_times_out_with_408(tmp_path: Path) -> None:
    with serve_target(tmp_path, body_timeout_s=1.0) as t:
        started = time.monotonic()
        s = _half_sent(t.url)
        with s:
            data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert time.monotonic() - started < 8
        assert b"request_timeout" in data


def test_concurrent_slow_bodies_are_bounded(tmp_path: Path) -> None:
    with serve_target(tmp_path, body_timeout_s=6.0, max_body_readers=2) as t:
        slow = [_half_sent(t.url) for _ in range(2)]
        try:
            time.sleep(0.3)
            body = orjson.dumps({"model": "fake-teacher", "messages": MSG})
            head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body) + 10).encode() + b"\r\n\r\n")
            result: list[bytes] = []
            third = threading.Thread(target=lambda: result.append(raw_request(t.url, head, body, wait_s=4.0)))
            third.start()
            third.join(5)
            assert result and result[0].startswith(b"HTTP/1.1 503"), result
            assert b"too_many_uploads" in result[0]
        finally:
            for s in slow:
                s.close()
