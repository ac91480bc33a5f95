"""The one small interface every teacher backend implements.

A teacher speaks the OpenAI wire format as plain dicts: a ``chat.completion`` request body in, a ``chat.completion``
(or a stream of ``chat.completion.chunk``) dict out, with ``usage`` filled in. The gateway never needs to know
whether the teacher is a remote HTTP endpoint or a model in this process.

Backends raise ``distillgate.errors.UpstreamError`` (with ``status``) when the teacher fails.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TeacherCard:
    """What identifies a teacher exactly; recorded with every generated row."""

    model_id: str
    backend: str
    file_sha256: str | None = None
    quantisation: str | None = None
    chat_template_sha256: str | None = None
    parameter_count: int | None = None
    source: str | None = None
    #: how the teacher answers when it is more than the model (e.g. retrieval over a labelled pool), and how its
    #: figures were measured
    method: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Teacher(abc.ABC):
    """A teacher model behind the OpenAI chat/completions wire format."""

    #: The model name clients use (e.g. ``local/smollm2-135m-instruct``).
    model_name: str

    @abc.abstractmethod
    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a ``/v1/chat/completions`` body (non-streaming) with a ``chat.completion`` dict incl. ``usage``."""

    @abc.abstractmethod
    def stream_chat_completion(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield ``chat.completion.chunk`` dicts; the last chunk carries ``usage``."""

    async def completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a legacy ``/v1/completions`` body. Backends that cannot, raise UpstreamError(status=400)."""
        from distillgate.errors import UpstreamError

        raise UpstreamError(f"teacher {self.model_name!r} does not serve /v1/completions", status=400)

    @abc.abstractmethod
    def card(self) -> TeacherCard:
        """The teacher card (model id, file hash, quantisation, template hash, parameter count)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections / memory."""
