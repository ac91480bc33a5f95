"""Routes: a model name answered by a trained student when it is confident enough, else by the teacher (a cascade).

    routes:
      banking-intent:                       # the model name clients ask for
        student: banking                    # a name under ``students`` (served as student/banking)
        teacher: fake-teacher               # any model name this gateway routes (an upstream or local/NAME)
        threshold: runs/r1/threshold.json   # `distillgate route choose` output: the threshold and its source
        projects: [proj-a]                  # only these projects are routed (default: every project)
        require_promoted: false             # true: a signed promotion.json (distillgate promote) must verify
        shadow:
          rate: 0.1                         # share of student-eligible requests also answered by the teacher
          window: 200                       # comparisons kept per slice (in the store's route_shadow table)
          min_samples: 30                   # no drift verdict before a slice has this many
          stop_on_drift: false              # true: a drifted slice is answered by the teacher (ROUTE_DRIFT)

For every request to a routed name the student gives its verdict first (``teachers/student.py``: a label and its
probability, or a text student's generation and its mean token probability); confidence ``>= threshold`` sends the
answer from the student, anything else goes to the teacher. The student answers only where the request's policy
approves ``student/NAME`` (else ``student_not_approved``), and, with the route's ``require_promoted`` or the
policy's ``promotion.required_for_routing``, only while its signed promotion record verifies: at the start (the
route's key) and once the student is loaded (both; else ``not_promoted``). The decision
log's admission entry carries ``extra.route`` (taken, confidence, threshold, its file's sha256 and source run), the
answer's ``model`` is the model that answered (so the stamp's response hash covers it) and ``distillgate.route``
repeats the choice. Shadow comparisons and drift: see :mod:`distillgate.gateway.shadow`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from distillgate.errors import ConfigError, ConfigIssue, DistillgateError, UpstreamError
from distillgate.gateway.errors import ApiError
from distillgate.gateway.shadow import ShadowLog, Window, wilson
from distillgate.policy.model import Policy
from distillgate.teachers.student import StudentTeacher, Verdict, stream_chunks

_log = logging.getLogger("distillgate.gateway.routes")
PROMOTION_FILE = "promotion.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShadowSettings(_Strict):
    rate: float = Field(default=0.0, ge=0.0, le=1.0)
    window: int = Field(default=200, ge=1, le=100_000)
    min_samples: int = Field(default=30, ge=1)
    stop_on_drift: bool = False


class RouteSettings(_Strict):
    student: str
    teacher: str
    threshold: str
    projects: list[str] | None = None
    require_promoted: bool = False
    #: the agreement the evaluation measured (default: the threshold file's student accuracy on routed items)
    expected_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)


@dataclass(frozen=True)
class Threshold:
    """A route's threshold file, read once at start."""

    value: float
    sha256: str
    source: dict[str, Any]
    agreement: float | None
    items: int  # evaluation items routed to the student at this threshold (the agreement's n)
    coverage: float
    coverage_items: int

    def coverage_ci(self) -> tuple[float, float]:
        return wilson(self.coverage * self.coverage_items, self.coverage_items)

    def agreement_ci(self) -> tuple[float, float]:
        return wilson((self.agreement or 0.0) * self.items, self.items)


def read_threshold(settings: RouteSettings, where: str) -> Threshold:
    from distillgate.evals.routing import load_threshold  # the format's one reader

    path = Path(settings.threshold)
    if not path.is_file():
        raise ConfigError(where, [ConfigIssue(f"{where}.threshold", f"{path} does not exist",
                                              "give the file `distillgate route choose --out` wrote")])
    t = load_threshold(path)
    routed = round(t.coverage * t.items)
    agreement = settings.expected_agreement if settings.expected_agreement is not None else t.student_accuracy
    return Threshold(t.threshold, hashlib.sha256(path.read_bytes()).hexdigest(),
                     {"student": t.student, "teacher": t.teacher, "suite": t.suite, "target": t.target},
                     agreement, routed, t.coverage, t.items)


@dataclass
class Choice:
    """One request's route: what was taken and why (``log()`` goes into the decision entry)."""

    name: str
    taken: Literal["student", "teacher"]
    reason: str  # confident | below_threshold | project_not_routed | student_not_approved | not_promoted | drift
    #              | student_error
    answered_by: str
    threshold: Threshold
    verdict: Verdict | None = None
    answer: dict[str, Any] | None = None
    shadow: bool = False
    slice_key: str = "*"
    flags: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What the answer says about its route (``distillgate.route``)."""
        return {k: v for k, v in self.log().items() if k in ("name", "taken", "reason", "answered_by", "confidence",
                                                             "threshold", "flags")}

    def log(self) -> dict[str, Any]:
        t = self.threshold
        return {"name": self.name, "taken": self.taken, "reason": self.reason, "answered_by": self.answered_by,
                "confidence": None if self.verdict is None else round(self.verdict.confidence, 6),
                "student_label": None if self.verdict is None else self.verdict.label,
                "threshold": "inf" if math.isinf(t.value) else t.value, "threshold_sha256": t.sha256,
                "source": t.source, "shadow": self.shadow, "slice": self.slice_key, "flags": self.flags}


class Answered:
    """An upstream whose answer is already known (the student answered while routing)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer

    async def post_raw(self, path: str, content: bytes) -> bytes:
        return orjson.dumps(self.answer)

    async def stream_raw(self, path: str, content: bytes) -> AsyncGenerator[bytes, None]:
        if path != "/chat/completions":
            raise UpstreamError(f"a student streams /chat/completions only, not {path}", status=400)
        for chunk in stream_chunks(self.answer):
            yield orjson.dumps(chunk)

    async def aclose(self) -> None:
        return None


def _norm(text: Any) -> str:
    return str(text or "").strip().strip(".!\"'").strip().lower()


def answer_text(resp: Mapping[str, Any]) -> str:
    choices = resp.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], Mapping) else {}
    msg = first.get("message")
    return str(msg.get("content") if isinstance(msg, Mapping) else first.get("text") or "")


class RouteMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("distillgate_route_requests_total", "Requests to routed model names, by route taken",
                                ["model", "taken", "reason"], registry=r)
        self.student_share = Gauge("distillgate_route_student_share", "Share of a route's requests the student "
                                   "answered (since start)", ["model"], registry=r)
        self.latency = Histogram("distillgate_route_seconds", "Routed requests: time to the answer, by route taken",
                                 ["model", "taken"], buckets=(.001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                                              5, 10, 30), registry=r)
        self.agreement = Gauge("distillgate_route_shadow_agreement", "Student-teacher agreement over the shadow "
                               "window", ["model", "slice"], registry=r)
        self.shadow_n = Gauge("distillgate_route_shadow_window", "Comparisons in the shadow window",
                              ["model", "slice"], registry=r)
        self.drift = Gauge("distillgate_route_drift", "1 when a slice's shadow agreement is below the evaluated "
                           "level by more than its CI", ["model", "slice"], registry=r)
        self.compared = Counter("distillgate_route_shadow_comparisons_total", "Shadow comparisons recorded",
                                ["model", "agree"], registry=r)
        self.shadow_errors = Counter("distillgate_route_shadow_errors_total", "Shadow teacher calls that failed",
                                     ["model"], registry=r)


TeacherCall = Callable[[str, bytes], Awaitable[bytes]]


class Cascade:
    """Every route of one gateway: the choice per request, the shadow comparisons, drift, metrics."""

    def __init__(self, routes: Mapping[str, RouteSettings], thresholds: Mapping[str, Threshold],
                 student: Callable[[str], Awaitable[StudentTeacher]], shadow_log: ShadowLog,
                 registry: CollectorRegistry, artefacts: Mapping[str, str] | None = None) -> None:
        """``artefacts``: student name -> its registered artefact (where the promotion record is verified once
        the student is loaded, for a route with ``require_promoted`` or a policy with
        ``promotion.required_for_routing``)."""
        self.routes = dict(routes)
        self._artefacts = dict(artefacts or {})
        #: student name -> why it is not promoted (None: its record verified after it was loaded)
        self._promotion: dict[str, str | None] = {}
        self.thresholds = dict(thresholds)
        self._student = student
        self.shadow_log = shadow_log
        self.metrics = RouteMetrics(registry)
        self._counts: dict[str, list[int]] = {name: [0, 0] for name in routes}
        self._drifted: dict[tuple[str, str], bool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: shadow comparisons recorded since start
        self.compared = 0

    def __contains__(self, model: object) -> bool:
        return model in self.routes

    def drifted(self, name: str, slice_key: str) -> bool:
        key = (name, slice_key)
        if key not in self._drifted:  # first look since start: the window in the store says
            self._judge(name, slice_key, self.shadow_log.window(name, slice_key, self.routes[name].shadow.window))
        return self._drifted[key]

    def _judge(self, name: str, slice_key: str, window: Window) -> bool:
        settings, t = self.routes[name], self.thresholds[name]
        low = t.agreement_ci()[0] if t.agreement is not None else 0.0
        agreement = window.agreement
        drift = window.n >= settings.shadow.min_samples and agreement is not None and agreement < low
        if drift and not self._drifted.get((name, slice_key), False):
            _log.warning("ROUTE_DRIFT route %r slice %r: shadow agreement %.3f over %d < %.3f (evaluated %.3f, "
                         "lower 95%% bound)", name, slice_key, agreement, window.n, low, t.agreement or 0.0)
        self._drifted[(name, slice_key)] = drift
        self.metrics.drift.labels(name, slice_key).set(1.0 if drift else 0.0)
        if agreement is not None:
            self.metrics.agreement.labels(name, slice_key).set(agreement)
        self.metrics.shadow_n.labels(name, slice_key).set(window.n)
        return drift

    async def choose(self, name: str, body: Mapping[str, Any], project: str | None, request_hash: str,
                     policy: Policy | None = None) -> Choice:
        """The route of one request under ``policy`` (the request's): a student it does not approve never answers
        (``student_not_approved``); with its ``promotion.required_for_routing`` (or the route's
        ``require_promoted``) an unpromoted one neither (``not_promoted``)."""
        settings, t = self.routes[name], self.thresholds[name]
        slice_key = project or "*"
        if settings.projects is not None and project not in settings.projects:
            return self._count(Choice(name, "teacher", "project_not_routed", settings.teacher, t, slice_key=slice_key))
        if policy is not None and not policy.model_approved(f"student/{settings.student}"):
            return self._count(Choice(name, "teacher", "student_not_approved", settings.teacher, t,
                                      slice_key=slice_key))
        try:
            student = await self._student(settings.student)
            promoted_only = settings.require_promoted or (policy is not None and
                                                          policy.promotion.required_for_routing)
            if promoted_only and (problem := await self._not_promoted(settings.student)):
                _log.warning("route %r: student %r is no longer promoted (%s); the teacher answers", name,
                             settings.student, problem)
                return self._count(Choice(name, "teacher", "not_promoted", settings.teacher, t,
                                          slice_key=slice_key))
            verdict = await student.aclassify(body)
        except (ApiError, UpstreamError) as exc:  # the teacher is the cascade's safe default
            _log.warning("route %r: the student could not classify (%s); the teacher answers", name, exc)
            return self._count(Choice(name, "teacher", "student_error", settings.teacher, t, slice_key=slice_key))
        eligible = verdict.confidence >= t.value
        sampled = eligible and _sampled(request_hash, settings.shadow.rate)
        if eligible and settings.shadow.stop_on_drift and self.drifted(name, slice_key):
            return self._count(Choice(name, "teacher", "drift", settings.teacher, t, verdict, shadow=sampled,
                                      slice_key=slice_key, flags=["ROUTE_DRIFT"]))
        if not eligible:
            return self._count(Choice(name, "teacher", "below_threshold", settings.teacher, t, verdict,
                                      slice_key=slice_key))
        answer = student.answer(verdict, chat="messages" in body)
        flags = ["ROUTE_DRIFT"] if self._drifted.get((name, slice_key)) else []
        return self._count(Choice(name, "student", "confident", student.model_name, t, verdict, answer,
                                  shadow=sampled, slice_key=slice_key, flags=flags))

    async def _not_promoted(self, student: str) -> str | None:
        """The promotion record checked once more after the student loaded: the weights served are the ones
        promoted (the start-time check alone would miss files swapped before the first request loads them)."""
        if student not in self._promotion:
            artefact = self._artefacts.get(student)
            self._promotion[student] = "its artefact is not known to the route" if artefact is None else \
                await asyncio.to_thread(_not_promoted, artefact)
        return self._promotion[student]

    def _count(self, choice: Choice) -> Choice:
        counts = self._counts[choice.name]
        counts[0] += 1
        counts[1] += choice.taken == "student"
        self.metrics.requests.labels(choice.name, choice.taken, choice.reason).inc()
        self.metrics.student_share.labels(choice.name).set(counts[1] / counts[0])
        return choice

    def answered(self, choice: Choice, seconds: float) -> None:
        self.metrics.latency.labels(choice.name, choice.taken).observe(seconds)

    def start_shadow(self, choice: Choice, path: str, body: Mapping[str, Any], call: TeacherCall,
                     request_hash: str) -> None:
        """Ask the teacher too, in the background, and record whether it agrees with the student."""
        if not choice.shadow or choice.verdict is None:
            return
        task = asyncio.ensure_future(self._shadow(choice, path, dict(body), call, request_hash))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, choice: Choice, path: str, body: dict[str, Any], call: TeacherCall,
                      request_hash: str) -> None:
        assert choice.verdict is not None
        body["stream"] = False
        body.pop("stream_options", None)
        try:
            raw = await call(path, orjson.dumps(body))
            teacher = answer_text(orjson.loads(raw))
        except (UpstreamError, DistillgateError, orjson.JSONDecodeError, OSError, TypeError, IndexError) as exc:
            self.metrics.shadow_errors.labels(choice.name).inc()
            _log.warning("shadow call of route %r failed: %s", choice.name, exc)
            return
        agree = _norm(teacher) == _norm(choice.verdict.label)
        window = await asyncio.to_thread(self.shadow_log.record, choice.name, choice.slice_key, agree, request_hash,
                                         self.routes[choice.name].shadow.window)
        self.compared += 1
        self.metrics.compared.labels(choice.name, str(agree).lower()).inc()
        self._judge(choice.name, choice.slice_key, window)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the shadow comparisons under way (shutdown, tests)."""
        started = time.monotonic()
        while self._tasks and time.monotonic() - started < timeout_s:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        self.shadow_log.close()


def _sampled(request_hash: str, rate: float) -> bool:
    """A deterministic sample: the same request body is always in (or out of) the shadow sample."""
    if rate <= 0:
        return False
    return int(request_hash[:8], 16) / 0xFFFFFFFF < rate or rate >= 1.0


def route_issues(routes: Mapping[str, RouteSettings], students: Mapping[str, str]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for name, r in routes.items():
        if r.student not in students:
            issues.append(ConfigIssue(f"routes.{name}.student", f"student {r.student!r} is not registered",
                                      f"add it under students (registered: {sorted(students)})"))
        elif r.require_promoted and (problem := _not_promoted(students[r.student])):
            issues.append(ConfigIssue(f"routes.{name}.require_promoted", f"student {r.student!r} is not promoted: "
                                      f"{problem}", "promote it (`distillgate promote`), or set "
                                      "require_promoted: false"))
        if name.startswith(("student/", "local/")) or name == r.teacher:
            issues.append(ConfigIssue(f"routes.{name}", "a route's name must be its own model name",
                                      "name it e.g. banking-intent, not student/... or the teacher's name"))
        if not Path(r.threshold).is_file():
            issues.append(ConfigIssue(f"routes.{name}.threshold", f"{r.threshold} does not exist",
                                      "give the file `distillgate route choose --out` wrote"))
        elif r.student in students and (problem := _kind_mismatch(students[r.student], Path(r.threshold))):
            issues.append(ConfigIssue(f"routes.{name}.threshold", problem,
                                      "choose the threshold on an evaluation of this student (`distillgate route "
                                      "choose`)"))
    return issues


def _kind_mismatch(artefact: str, threshold: Path) -> str | None:
    """Why the threshold file's confidence kind is not the one the student's verdicts carry (None: it is)."""
    from distillgate.evals.routing import load_threshold
    from distillgate.teachers.student import artefact_issue, read_card

    if artefact_issue(artefact) is not None:
        return None  # reported under students.<name>
    try:
        kind = load_threshold(threshold).confidence
    except DistillgateError:
        return None  # an invalid file is reported with its own problems when the gateway starts
    own = read_card(artefact)["confidence"]
    if kind != own:
        return (f"the threshold is on confidence {kind!r}, but the student's verdicts carry {own!r} "
                f"(a {read_card(artefact)['task']} student)")
    return None


def _not_promoted(artefact: str) -> str | None:
    """Why the artefact is not a promoted student (None when its signed promotion record verifies)."""
    from distillgate.errors import IntegrityError
    from distillgate.evals.promotion import verify_promotion  # the promotion record's one verifier

    base = Path(artefact)
    record = next((p for p in (base / PROMOTION_FILE, base.parent / PROMOTION_FILE) if p.is_file()), None)
    if record is None:
        return f"no {PROMOTION_FILE} beside its model"
    try:
        verify_promotion(record)
    except (IntegrityError, ValueError, KeyError, TypeError) as exc:
        return str(exc)
    return None
