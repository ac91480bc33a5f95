"""Model name → upstream. HTTP upstreams are pooled ``HttpTeacher``s; ``local/NAME`` models are in-process
teachers loaded lazily (once, off the event loop) through ``distillgate.teachers.registry.load_teacher``.

A request never names a path: ``NAME`` must be a key of the gateway's ``local_models`` registry, whose value (the
operator's) is the spec that is loaded. Any other name is refused with one message that says nothing about the
disk, and the cache of loaded teachers is keyed by the registered name, so it holds at most one teacher per entry.

Every upstream is used through two raw-bytes calls, ``post_raw(path, body)`` and ``stream_raw(path, body)``; an
in-process ``Teacher`` is adapted to them by :class:`TeacherUpstream`.

``student/NAME`` models are trained students (``distillgate.teachers.student``: encoder classifiers and causal
LMs), registered by name under ``students`` the same way, loaded once on first use.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from distillgate.errors import UpstreamError
from distillgate.gateway.errors import ApiError
from distillgate.teachers.base import Teacher
from distillgate.teachers.http import HttpTeacher, HttpUpstreamConfig
from distillgate.teachers.student import StudentTeacher, load_student, public_card

_log = logging.getLogger("distillgate.gateway")


class Upstream(Protocol):
    async def post_raw(self, path: str, content: bytes) -> bytes: ...

    def stream_raw(self, path: str, content: bytes) -> AsyncGenerator[bytes, None]: ...

    async def aclose(self) -> None: ...


class TeacherUpstream:
    """Adapts any in-process ``Teacher`` to the raw-bytes upstream calls."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher

    async def post_raw(self, path: str, content: bytes) -> bytes:
        body = orjson.loads(content)
        if path == "/chat/completions":
            return orjson.dumps(await self.teacher.chat_completion(body))
        return orjson.dumps(await self.teacher.completion(body))

    async def stream_raw(self, path: str, content: bytes) -> AsyncGenerator[bytes, None]:
        if path != "/chat/completions":
            raise UpstreamError(f"teacher {self.teacher.model_name!r} cannot stream {path}", status=400)
        async for chunk in self.teacher.stream_chat_completion(orjson.loads(content)):
            yield orjson.dumps(chunk)

    async def aclose(self) -> None:
        await self.teacher.aclose()


@dataclass(frozen=True)
class Route:
    upstream_name: str
    upstream_model: str  # the model name sent upstream


class Router:
    """Resolves model names and owns the upstream clients."""

    def __init__(self, http: Mapping[str, HttpUpstreamConfig], models: Mapping[str, str] | None = None, *,
                 local_models: Mapping[str, str] | None = None,
                 local_loader: Callable[[str], Teacher] | None = None,
                 students: Mapping[str, str] | None = None) -> None:
        """``local_models``: registered name -> spec; ``local_loader(spec) -> Teacher`` loads one (default: the
        teachers registry)."""
        self._http: dict[str, Upstream] = {name: HttpTeacher(cfg) for name, cfg in http.items()}
        self._models = dict(models or {})
        self._registry = dict(local_models or {})
        self._load_local = local_loader or _load_local
        self._local: dict[str, Upstream] = {}
        self._local_lock = asyncio.Lock()
        self._listed: tuple[float, list[str]] | None = None
        self._students = dict(students or {})
        self._loaded_students: dict[str, StudentTeacher] = {}
        self._routes: dict[str, Route] = {}  # model name -> its route (the config is fixed): found once

    @property
    def students(self) -> list[str]:
        return sorted(self._students)

    @property
    def names(self) -> list[str]:
        return sorted(self._http)

    def route(self, model: str) -> Route:
        """The route of ``model`` (a 404 ``ApiError`` when none serves it). Each name is resolved once."""
        route = self._routes.get(model)
        if route is None:
            route = self._resolve(model)
            if len(self._routes) < 4096:  # names are the client's: the memo is capped, never unbounded
                self._routes[model] = route
        return route

    def _resolve(self, model: str) -> Route:
        for pattern, name in self._models.items():
            if fnmatch.fnmatchcase(model, pattern):
                return Route(name, model)
        if "/" in model:
            prefix, rest = model.split("/", 1)
            if prefix in self._http and rest:
                return Route(prefix, rest)
            if prefix == "local":
                return Route("local", self._registered(model))
            if prefix == "student":
                return Route("student", self._student_name(model))
        if len(self._http) == 1:
            return Route(next(iter(self._http)), model)
        raise ApiError(404, f"the model {model!r} does not exist on this gateway (no upstream serves it)",
                       code="model_not_found", param="model")

    def _registered(self, model: str) -> str:
        """The registry name of ``local/NAME`` (or of a name the ``models`` table sends to ``local``)."""
        name = model[len("local/"):] if model.startswith("local/") else model
        if name not in self._registry:
            raise ApiError(404, f"the model {model!r} is not a local model of this gateway (registered: "
                           f"{sorted('local/' + n for n in self._registry)}); an operator adds one under "
                           "local_models in the gateway config", code="model_not_found", param="model")
        return name

    def _student_name(self, model: str) -> str:
        name = model[len("student/"):]
        if name not in self._students:
            raise ApiError(404, f"the model {model!r} is not a student of this gateway (registered: "
                           f"{sorted('student/' + n for n in self._students)}); an operator adds one under "
                           "students in the gateway config", code="model_not_found", param="model")
        return name

    def configured_models(self) -> list[str]:
        """Model names the config names explicitly (glob patterns excluded)."""
        return [m for m in self._models if not any(ch in m for ch in "*?[")] + \
            [f"local/{n}" for n in sorted(self._registry)] + [f"student/{n}" for n in sorted(self._students)]

    def student_card(self, name: str) -> dict[str, Any]:
        """What ``/v1/models`` says about ``student/NAME`` (read from its card file; no weights loaded)."""
        return public_card(self._students[name])

    async def student(self, name: str) -> StudentTeacher:
        """The registered student NAME, loaded once (off the event loop)."""
        if name not in self._loaded_students:
            async with self._local_lock:
                if name not in self._loaded_students:
                    try:
                        self._loaded_students[name] = await asyncio.to_thread(
                            load_student, name, self._students[name])
                    except Exception as exc:
                        _log.exception("student %r (artefact %r) failed to load", name, self._students[name])
                        raise ApiError(503, f"the registered student 'student/{name}' could not be loaded "
                                       f"({type(exc).__name__}); the operator's log has the cause",
                                       code="model_unavailable", param="model") from exc
        return self._loaded_students[name]

    async def upstream_models(self, max_age_s: float = 60.0) -> list[str]:
        """Model ids the HTTP upstreams list at ``/models`` (cached; an upstream that fails is skipped).

        With one upstream the ids are as listed; with several they are prefixed ``NAME/`` (how they route).
        """
        now = time.monotonic()
        if self._listed is not None and now - self._listed[0] < max_age_s:
            return self._listed[1]
        names: list[str] = []
        for name, up in self._http.items():
            if not isinstance(up, HttpTeacher):
                continue
            try:
                ids = await up.get_models()
            except (UpstreamError, OSError, ValueError, KeyError, TypeError):
                continue
            names += ids if len(self._http) == 1 else [f"{name}/{i}" for i in ids]
        self._listed = (now, names)
        return names

    def http(self, route: Route) -> Upstream | None:
        """The HTTP upstream of ``route`` without a coroutine; None for the others (``get`` loads those)."""
        name = route.upstream_name
        return self._http.get(name) if name != "student" and name != "local" else None

    async def get(self, route: Route) -> Upstream:
        if route.upstream_name == "student":
            return TeacherUpstream(await self.student(self._student_name("student/" + route.upstream_model)))
        if route.upstream_name != "local":
            return self._http[route.upstream_name]
        name = self._registered(route.upstream_model)
        if name not in self._local:
            async with self._local_lock:
                if name not in self._local:
                    try:
                        teacher = await asyncio.to_thread(self._load_local, self._registry[name])
                    except ApiError:
                        raise
                    except Exception as exc:  # the operator's spec is broken: say so, without the path
                        _log.exception("local model %r (spec %r) failed to load", name, self._registry[name])
                        raise ApiError(503, f"the registered local model 'local/{name}' could not be loaded "
                                       f"({type(exc).__name__}); the operator's log has the cause",
                                       code="model_unavailable", param="model") from exc
                    self._local[name] = TeacherUpstream(teacher)
        return self._local[name]

    async def aclose(self) -> None:
        for up in [*self._http.values(), *self._local.values()]:
            await up.aclose()
        for student in self._loaded_students.values():
            await student.aclose()


def _load_local(spec: str) -> Teacher:
    try:
        registry: Any = importlib.import_module("distillgate.teachers.registry")
    except ImportError as exc:
        raise ApiError(404, f"model {spec!r}: local teachers are not available in this build",
                       code="model_not_found", param="model") from exc
    teacher: Teacher = registry.load_teacher(spec)
    return teacher
