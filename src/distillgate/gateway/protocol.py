"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with two changes at the wire.

- **The request head is bounded while it arrives.** httptools keeps the header block in memory until it is complete,
  so a client sending megabytes of headers made the server hold them all before the app's 431 (gateway/http.py).
  Here every chunk read while a request's head is still incomplete counts against ``max_header_bytes``; past it
  the client gets a 431 (JSON, OpenAI-shaped) and the connection closes. What is held is at most the bound plus two
  reads. A head that arrives whole in one read is judged by the app's ``header_map``, with the same bound.
- **A request the parser rejects** (obs-fold, NUL in a header, Content-Length with Transfer-Encoding, ...) gets an
  OpenAI-shaped JSON 400 (``code: invalid_http``) instead of uvicorn's plain text, and the connection closes.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from distillgate.gateway.errors import error_body


def _answer(status: int, reason: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))) + body


class GatewayHttpProtocol(HttpToolsProtocol):
    """See the module docstring. ``max_header_bytes`` is set per gateway by :func:`gateway_protocol`."""

    max_header_bytes = 32 << 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a connection starts with a request's head
        self._head_bytes = 0
        self._message_done = False  # a request ended within the current read

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0  # keep-alive: the next request's head comes next
        self._message_done = True
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        in_head, self._message_done = self._in_head, False
        super().data_received(data)
        # A read that began and ended inside one request's head was head bytes only. A read that completes a head
        # is not counted (the app's header_map judges a head that came whole), nor one that ends a pipelined
        # request and begins the next head (its bytes are mostly the earlier request's): at most the bound plus
        # two reads are held.
        if in_head and self._in_head and not self._message_done and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self.transport.write(_answer(431, b"Request Header Fields Too Large", error_body(
                    431, f"the request headers are larger than {self.max_header_bytes} bytes; send fewer or "
                    "shorter headers", code="request_header_fields_too_large")))
                self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_answer(400, b"Bad Request", error_body(
            400, "the request is not valid HTTP/1.1 (e.g. a folded header line, a NUL byte in a header, or both "
            "Content-Length and Transfer-Encoding); send one well-formed request", code="invalid_http")))
        self.transport.close()


def gateway_protocol(max_header_bytes: int) -> type[GatewayHttpProtocol]:
    """The protocol class uvicorn runs (``uvicorn.run(..., http=gateway_protocol(n))``) for a gateway whose
    ``max_header_bytes`` is ``n``."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"max_header_bytes": max_header_bytes})
