"""The upstream HTTP/1.1 client (``distillgate.teachers.h1``) against scripted raw servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from distillgate.teachers.h1 import ConnectionFailed, ConnectTimeout, HttpPool, ReadTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return lines[0], headers, body


class Server:
    """A loopback server; ``handler(reader, writer, n)`` answers the n-th request and says whether to keep going."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.open_now = 0
        self.max_open = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            while True:
                try:
                    self.requests.append(await _read_request(reader))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if not await self.handler(reader, writer, len(self.requests)):
                    return
        finally:
            self.open_now -= 1
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def ok(body: bytes = b'{"ok": true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def answer_and_close(raw: bytes) -> Handler:
    """A handler that writes ``raw`` as its whole answer, then closes the connection."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(raw)
        await w.drain()
        return False

    return handler


def expect_failure(handler: Handler, match: str) -> None:
    """One GET against ``handler`` fails with ConnectionFailed matching ``match``."""

    async def go() -> None:
        async with Server(handler) as base:
            with pytest.raises(ConnectionFailed, match=match):
                await HttpPool(base).request("GET", "/")

    run(go())


PIECE, PIECES = 65536, 64  # a 4 MiB body, far more than the client buffers before it pauses reading
_BLOCK = b"y" * PIECE


async def big_body(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (PIECE * PIECES))
    for _ in range(PIECES):
        w.write(_BLOCK)
        await w.drain()
    return True


def test_keep_alive_request_path_headers_and_body() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(ok(b'{"n": %d}' % n))
        await w.drain()
        return True

    async def go() -> None:
        srv = Server(handler)
        async with srv as base:
            pool = HttpPool(base, {"authorization": "Bearer k"})
            for i in range(1, 4):
                resp = await pool.request("POST", "/chat/completions", b'{"q": 1}')
                assert resp.status == 200 and await resp.read() == b'{"n": %d}' % i
                assert resp.header(b"content-type") == "application/json"
            await pool.aclose()
        line, headers, body = srv.requests[0]
        assert line == b"POST /v1/chat/completions HTTP/1.1" and body == b'{"q": 1}'
        assert headers[b"authorization"] == b"Bearer k" and headers[b"host"].startswith(b"127.0.0.1:")
        assert srv.connections == 1  # one keep-alive connection served all three

    run(go())


def test_chunked_and_connection_delimited_bodies() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        if n != 2:
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            await w.drain()
            return True
        w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")  # no length: ends with the connection
        await w.drain()
        return False

    async def go() -> None:
        srv = Server(handler)
        async with srv as base:
            pool = HttpPool(base)
            assert await (await pool.request("GET", "/a")).read() == b"hello world"
            resp = await pool.request("GET", "/b")
            assert await resp.read() == b"until the end" and not resp.keep_alive
            assert await (await pool.request("GET", "/c")).read() == b"hello world"  # a fresh connection
            assert srv.connections == 2

    run(go())


def test_a_reused_connection_closed_by_the_server_is_retried_once_on_a_fresh_one() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        if n == 2:  # the server closes the idle connection just as the second request arrives (keep-alive race)
            return False
        w.write(ok(b"%d" % n))
        await w.drain()
        return True

    async def go() -> None:
        srv = Server(handler)
        async with srv as base:
            pool = HttpPool(base)
            assert await (await pool.request("POST", "/x", b"1")).read() == b"1"
            assert await (await pool.request("POST", "/x", b"2")).read() == b"3"  # sent again, answered
            assert srv.connections == 2 and [body for _, _, body in srv.requests] == [b"1", b"2", b"2"]

    run(go())


def test_a_stale_connection_drops_the_other_idle_ones() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        if n == 4:  # the server closed this warm connection (idle timeout): the others are as old
            return False
        await asyncio.sleep(0.02)
        w.write(ok(b"%d" % n))
        await w.drain()
        return True

    async def go() -> None:
        srv = Server(handler)
        async with srv as base:
            pool = HttpPool(base)
            await asyncio.gather(*[pool.request("GET", "/") for _ in range(3)])  # three warm connections
            assert len(pool._idle) == 3
            assert await (await pool.request("GET", "/")).read() == b"5"  # resent on a fresh connection
            assert srv.connections == 4 and pool._open == 1 and len(pool._idle) == 1

    run(go())


def test_a_server_restart_costs_no_error() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(ok(b"%d" % n))
        await w.drain()
        return True

    async def go() -> None:
        srv = Server(handler)
        async with srv as base:
            pool = HttpPool(base)
            await asyncio.gather(*[pool.request("GET", "/") for _ in range(3)])
            port = srv.server.sockets[0].getsockname()[1]
            srv.server.close()
            for w in srv.writers:  # a restart closes every connection
                w.close()
            await asyncio.sleep(0.05)
            srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", port)
            assert (await pool.request("GET", "/")).status == 200
            assert srv.connections == 4

    run(go())


def test_a_fresh_connection_closed_before_answering_is_not_retried_here() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        return False

    async def go() -> None:
        srv = Server(handler)
        async with srv as base:
            with pytest.raises(ConnectionFailed, match="before the answer ended"):
                await HttpPool(base).request("POST", "/x", b"1")
            assert len(srv.requests) == 1  # the caller's retry policy decides (HttpTeacher: max_retries)

    run(go())


def test_a_connection_cut_midway_is_an_error_not_a_short_body() -> None:
    expect_failure(answer_and_close(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part"),
                   "before the answer ended")


def test_a_reset_ends_a_connection_delimited_body_as_an_error() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npartial")
        await w.drain()
        await asyncio.sleep(0.05)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a TCP reset
        w.transport.abort()
        return False

    expect_failure(handler, "before the answer ended")


def test_malformed_answer_is_reported() -> None:
    expect_failure(answer_and_close(b"SMTP ready\r\n\r\n"), "malformed HTTP answer")


def test_read_timeout_is_between_bytes_not_total() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:  # silent: times out
            await asyncio.sleep(1.0)
            return False
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.6 s in all, never 0.3 s without a byte
            await asyncio.sleep(0.1)
            w.write(b"1\r\nx\r\n")
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        return True

    async def go() -> None:
        async with Server(handler) as base:
            pool = HttpPool(base, read_timeout_s=0.3)
            with pytest.raises(ReadTimeout):
                await pool.request("GET", "/")
            assert await (await pool.request("GET", "/")).read() == b"x" * 6

    run(go())


def test_a_keep_alive_connection_keeps_one_read_timer_and_each_request_gets_its_whole_timeout() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        if n == 3:  # silent: times out, a whole read timeout after it was sent
            await asyncio.sleep(2.0)
            return False
        w.write(ok())
        await w.drain()
        return True

    async def go() -> None:
        async with Server(handler) as base:
            pool = HttpPool(base, read_timeout_s=0.4)
            await pool.request("GET", "/")
            conn = pool._idle[0]
            timer = conn._timer
            assert timer is not None  # armed by the first request, left running after its answer
            await asyncio.sleep(0.25)
            await pool.request("GET", "/")
            assert pool._idle == [conn] and conn._timer is timer  # the second request armed none
            await asyncio.sleep(0.25)  # the first timer fired meanwhile: no request was in flight, it lapsed
            assert conn._timer is None
            await asyncio.sleep(0.1)
            started = time.monotonic()
            with pytest.raises(ReadTimeout):
                await pool.request("GET", "/")
            assert time.monotonic() - started >= 0.39

    run(go())


def test_a_request_sent_just_before_the_timer_fires_is_given_the_rest_of_its_timeout() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        if n == 2:
            await asyncio.sleep(0.3)  # slower than what the first request left of the timer, within its own
        w.write(ok())
        await w.drain()
        return True

    async def go() -> None:
        async with Server(handler) as base:
            pool = HttpPool(base, read_timeout_s=0.4)
            await pool.request("GET", "/")
            await asyncio.sleep(0.3)
            assert await (await pool.request("GET", "/")).read() == b'{"ok": true}'

    run(go())


def test_connection_limit_is_kept_and_every_waiter_is_served() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        await asyncio.sleep(0.01)
        w.write(ok())
        await w.drain()
        return True

    async def go() -> None:
        srv = Server(handler)
        async with srv as base:
            pool = HttpPool(base, max_connections=2)
            answers = await asyncio.gather(*[pool.request("GET", "/") for _ in range(20)])
            assert all(a.status == 200 for a in answers)
            assert srv.max_open <= 2 and len(srv.requests) == 20

    run(go())


def test_cancelled_request_drops_its_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:
            await asyncio.sleep(0.5)
        w.write(ok(b"%d" % n))
        await w.drain()
        return True

    async def go() -> None:
        srv = Server(handler)
        async with srv as base:
            pool = HttpPool(base)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.request("GET", "/"), 0.1)
            assert pool._open == 0 and not pool._idle  # never reused: its answer would belong to the old request
            assert await (await pool.request("GET", "/")).read() == b"2"
            assert srv.connections == 2

    run(go())


def test_streaming_pauses_reading_for_a_slow_consumer_and_loses_nothing() -> None:
    async def go() -> None:
        async with Server(big_body) as base:
            pool = HttpPool(base, read_timeout_s=0.5)
            got = 0
            most = 0  # the most bytes held for the consumer at once
            async with pool.stream("GET", "/") as resp:
                async for chunk in resp.iter_chunks():
                    got += len(chunk)
                    most = max(most, resp._buffered + len(chunk))
                    await asyncio.sleep(0.002)  # slower than loopback
            assert got == PIECE * PIECES
            assert most < 1024 * 1024  # of 4 MiB sent: reading paused instead of buffering it all
            assert len(pool._idle) == 1  # read to the end: reusable

    run(go())


def test_a_consumer_slower_than_the_read_timeout_is_not_a_timeout() -> None:
    async def go() -> None:
        async with Server(big_body) as base:
            pool = HttpPool(base, read_timeout_s=0.2)
            got = 0
            async with pool.stream("GET", "/") as resp:
                async for chunk in resp.iter_chunks():
                    if got == 0:
                        await asyncio.sleep(0.6)  # reading is paused meanwhile: the server is not silent
                    got += len(chunk)
            assert got == PIECE * PIECES

    run(go())


def test_connect_refused_and_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there
        with pytest.raises(ConnectionFailed, match="cannot connect"):
            await HttpPool(f"http://127.0.0.1:{port}/v1").request("GET", "/")

        loop = asyncio.get_running_loop()

        async def never(*a: object, **k: object) -> None:
            await asyncio.sleep(10)

        monkeypatch.setattr(loop, "create_connection", never)
        pool = HttpPool(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.05)
        with pytest.raises(ConnectTimeout):
            await pool.request("GET", "/")
        assert pool._open == 0

    run(go())


def test_bad_urls_and_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HttpPool("ftp://example.com/v1")
    with pytest.raises(ValueError, match="line break"):
        HttpPool("http://example.com/v1", {"x-evil": "a\r\nhost: other"})


def test_https_with_a_trusted_certificate_and_refusal_of_an_untrusted_one(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(ok(b"secret"))
        await w.drain()
        return True

    async def go() -> None:
        srv = Server(handler)
        srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.server.sockets[0].getsockname()[1]
        base = f"https://127.0.0.1:{port}/v1"
        with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):  # not trusted (yet)
            await HttpPool(base).request("GET", "/")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # trusted the way operators add a CA
        pool = HttpPool(base)
        for _ in range(2):
            assert await (await pool.request("GET", "/")).read() == b"secret"
        srv.server.close()
        assert pool.connections_made == 1  # kept alive over TLS

    run(go())
