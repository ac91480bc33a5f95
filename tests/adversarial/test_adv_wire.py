"""At the wire (gateway/protocol.py): a head larger than the bound is refused while it arrives, not after the server
has held all of it, and a request the HTTP parser rejects gets an OpenAI-shaped JSON 400."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from _adversarial import Target, serve_target

from distillgate.gateway.protocol import gateway_protocol

BOUND = 8 << 10


@pytest.fixture()
def wire(tmp_path: Path) -> Iterator[tuple[Target, int]]:
    """The adversarial target behind the protocol class ``gateway serve`` runs."""
    with serve_target(tmp_path, max_header_bytes=BOUND, http=gateway_protocol(BOUND)) as target:
        yield target, int(target.url.rsplit(":", 1)[1])


def _answer(sock: socket.socket) -> tuple[bytes, dict[str, object]]:
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, orjson.loads(body)


def test_a_head_sent_in_pieces_is_refused_once_past_the_bound(wire: tuple[Target, int]) -> None:
    target, port = wire
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(1024):  # up to 1 MiB of headers, 1 KiB at a time
                s.sendall(b"x-pad-%04d: %s\r\n" % (i, b"a" * 1000))
                sent += 1
                time.sleep(0.002)
        head, body = _answer(s)
    assert head.startswith(b"HTTP/1.1 431") and b"application/json" in head
    assert body["error"]["code"] == "request_header_fields_too_large"  # type: ignore[index]
    assert sent < 1024 // 4  # refused long before the client was done (the bound is 8 KiB)
    assert not target.entries()  # nothing decided or logged


@pytest.mark.parametrize("head", [
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\ncontent-length: 2\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-nul: a\x00b\r\ncontent-length: 2\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n{}",
], ids=["obs-fold", "nul", "cl-and-te"])
def test_malformed_http_gets_a_json_400(wire: tuple[Target, int], head: bytes) -> None:
    target, port = wire
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        status, body = _answer(s)
    assert status.startswith(b"HTTP/1.1 400") and b"application/json" in status
    assert body["error"]["code"] == "invalid_http"  # type: ignore[index]
    assert not target.entries()


def test_a_normal_request_and_keep_alive_still_work(wire: tuple[Target, int]) -> None:
    """The head count starts again with each request on a kept-alive connection: many requests whose heads add
    up to more than the bound all pass."""
    target, port = wire
    body = orjson.dumps({"model": "fake-teacher", "messages": [{"role": "user", "content": "hi"}]})
    headers = "".join(f"{k}: {v}\r\n" for k, v in target.headers().items())
    pad = "x-pad: " + "a" * 2000 + "\r\n"
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n{headers}{pad}\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(6):  # 6 x ~2.5 KiB of heads > 8 KiB
            s.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(rest) < length:
                rest += s.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head


def _read_answer(s: socket.socket, data: bytes = b"") -> tuple[bytes, bytes]:
    """One answer off a kept-alive connection: (head, what came after its body)."""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += s.recv(65536)
    return head, rest[length:]


def test_a_pipelined_large_body_does_not_count_against_the_next_head(wire: tuple[Target, int]) -> None:
    """A read that ends one request (here with a body larger than the head bound) and begins the next head is not
    head bytes: both requests are answered."""
    target, port = wire
    headers = "".join(f"{k}: {v}\r\n" for k, v in target.headers().items())

    def request(text: str) -> bytes:
        body = orjson.dumps({"model": "fake-teacher", "messages": [{"role": "user", "content": text}]})
        return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{headers}\r\n").encode() + body

    first, second = request("a " * (3 * BOUND)), request("hi")
    cut = 40  # the second request's first bytes go with the first request
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(first + second[:cut])
        time.sleep(0.3)
        s.sendall(second[cut:])
        head, rest = _read_answer(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        head, _ = _read_answer(s, rest)
        assert head.startswith(b"HTTP/1.1 200"), head
