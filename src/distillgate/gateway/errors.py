"""OpenAI-shaped error answers: ``{"error": {"message", "type", "code", "param", "reasons": [...]}}``.

``ApiError`` is raised inside the gateway's request handling and turned into that body by the app; it never leaves
the gateway package (it is not part of the user-facing error tree in ``distillgate.errors``).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ApiError(Exception):
    """A request the gateway answers with an error body (never a bare 500)."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 reasons: Sequence[str] = (), headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.reasons = tuple(reasons)
        self.headers = tuple(headers)

    def body(self) -> bytes:
        return error_body(self.status, self.message, code=self.code, param=self.param, reasons=self.reasons)


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               reasons: Sequence[str] = ()) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type(status), "code": code,
                                   "param": param, "reasons": list(reasons)}})
