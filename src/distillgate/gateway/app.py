"""The gateway as a plain ASGI application (no framework on the hot path), built as small layers.

    error layer   Gateway.__call__: a Responder wraps send (knows whether headers went out); errors are answered
                  OpenAI-shaped (JSON, or a last SSE event mid-stream); request metrics
    routing       one table: path -> (method, handler)
    inference     parse → identify → judge → admit → forward → settle → stamp, each a small method over one
                  per-request Exchange (gateway/exchange.py):
      parse       headers (431 oversized, 400 duplicated identity), body (413, 408 slow, 503 too many slow),
                  validation (400): everything refused here is refused before admission, so nothing is reserved
      identify    API key, prompt screens, model route (404), the governing policy: chosen once, passed down
      judge       the extraction monitor's signals → the policy Request
      route       a routed model name: student or teacher (gateway/routes.py), recorded in the decision entry
      admit       Store.aadmit_early (decide + reserve + log; the commit's fsync overlaps forwarding; the
                  Responder's gate holds every byte of the answer until the decision is durable)
      forward     the upstream's answer, streamed or not, into one assembled answer (gateway/answer.py)
      settle      one settlement; every other exit after admission refunds through the Ticket (exchange.py)
      stamp       one signed stamp over the assembled answer; the answer (or the stream's last chunk) carries it
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from distillgate.canonical import sha256_hex
from distillgate.errors import DistillgateError, StoreUnavailable, UpstreamError, UserError
from distillgate.extraction import ExtractionMonitor, RequestFeatures
from distillgate.extraction.local import LocalMonitor
from distillgate.extraction.process import MonitorUnavailable
from distillgate.extraction.seam import Monitor
from distillgate.gateway.answer import StreamAssembly, answer_digest
from distillgate.gateway.contracts import check_output
from distillgate.gateway.errors import ApiError, error_body
from distillgate.gateway.exchange import ClientGone, Exchange, Ticket
from distillgate.gateway.http import (
    SSE_HEADERS,
    BodyReader,
    Receive,
    Responder,
    Scope,
    Send,
    header_map,
    wait_disconnect,
)
from distillgate.gateway.judge import gateway_request, screen_hits
from distillgate.gateway.metrics import Metrics
from distillgate.gateway.openapi import openapi_document
from distillgate.gateway.parse import parse_request
from distillgate.gateway.routes import Answered, Cascade
from distillgate.gateway.screens import Screen
from distillgate.gateway.stamps import STAMP_HEADER, issue_stamp
from distillgate.gateway.upstreams import Route, Router, Upstream
from distillgate.keys import KeyStore
from distillgate.ledger.store import LogEntry, Store
from distillgate.policy import Policy, PolicySet

_log = logging.getLogger("distillgate.gateway")
_UPSTREAM_PATHS = {"chat": "/chat/completions", "completions": "/completions"}
_STAMP_HEADER = STAMP_HEADER.encode()
Handler = Callable[[Scope, Receive, Responder], Awaitable[None]]


def _bearer(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization")
    if not auth:
        return headers.get("x-api-key") or None
    scheme, _, token = auth.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _round_logprobs(obj: Any, digits: int) -> None:
    """Round every ``logprob`` / ``token_logprobs`` value in place (policy hardening.round_logprobs)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "logprob" and isinstance(value, float):
                obj[key] = round(value, digits)
            elif key == "token_logprobs" and isinstance(value, list):
                obj[key] = [round(v, digits) if isinstance(v, float) else v for v in value]
            elif key == "top_logprobs" and isinstance(value, list) and value and isinstance(value[0], dict) \
                    and "token" not in value[0]:  # completions: [{token: logprob}]
                obj[key] = [{t: round(lp, digits) for t, lp in d.items()} for d in value]
            else:
                _round_logprobs(value, digits)
    elif isinstance(obj, list):
        for item in obj:
            _round_logprobs(item, digits)


def _upstream_status(exc: UpstreamError) -> tuple[int, str]:
    status = exc.status or 502
    if status == 504:
        return 504, "upstream_timeout"
    if status == 429:
        return 503, "upstream_rate_limited"
    if 400 <= status < 500:
        return status, "upstream_rejected"
    return 502, "upstream_error"


class Gateway:
    """The ASGI app. Build it with :func:`distillgate.gateway.server.build_gateway` or directly for tests."""

    def __init__(self, *, policies: PolicySet, store: Store, keys: KeyStore, router: Router,
                 screens: Sequence[Screen], max_body_bytes: int = 1 << 20, reclaim_interval_s: float = 30.0,
                 metrics: Metrics | None = None, settle_before_reply: bool = True,
                 monitor: Monitor | None = None, max_header_bytes: int = 32 << 10,
                 body_timeout_s: float = 30.0, max_body_readers: int = 256,
                 cascade: Callable[[Metrics], Cascade] | None = None) -> None:
        self.policies = policies
        #: extraction-abuse signals on every request (docs/extraction.md); the policy decides what they do
        self.monitor: Monitor = monitor if monitor is not None else LocalMonitor(ExtractionMonitor(policies))
        self.store = store
        self.keys = keys
        self.router = router
        self.screens = tuple(screens)
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.bodies = BodyReader(max_body_bytes, body_timeout_s, max_body_readers)
        self.reclaim_interval_s = reclaim_interval_s
        self.metrics = metrics or Metrics()
        self._handling = 0  # requests being handled: the in-flight gauge reads it when scraped
        self.metrics.in_flight.set_function(lambda: self._handling)
        self.metrics.embed_backlog.set_function(lambda: self.monitor.status().backlog)
        self.metrics.embed_dropped.set_function(lambda: self.monitor.status().dropped)
        self.settle_before_reply = settle_before_reply
        #: routed model names (student-or-teacher cascades), built over this gateway's metrics registry
        self.cascade: Cascade | None = cascade(self.metrics) if cascade is not None else None
        self._reclaimer: asyncio.Task[None] | None = None
        self._monitor_start: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Future[Any]] = set()
        #: reservations of requests being answered: the reclaim loop renews their leases
        self.in_flight: set[str] = set()
        self._openapi = orjson.dumps(openapi_document())
        self._routes: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": ("POST", functools.partial(self._inference, "chat")),
            "/v1/completions": ("POST", functools.partial(self._inference, "completions")),
            "/v1/models": ("GET", self._models),
            "/healthz": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
            "/openapi.json": ("GET", self._openapi_doc),
        }

    # -- the error layer ----------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        started = time.perf_counter()
        out = Responder(send)
        self._handling += 1
        try:
            route = self._routes.get(path)
            if route is None:
                raise ApiError(404, f"no route {scope['method']} {path}; see /openapi.json", code="not_found")
            method, handler = route
            if scope["method"] != method:
                raise ApiError(405, f"{path} accepts {method} only", code="method_not_allowed",
                               headers=[(b"allow", method.encode())])
            await handler(scope, receive, out)
        except ApiError as exc:
            await self._answer_error(out, exc.status, exc.body(), exc.headers)
        except UpstreamError as exc:
            status, code = _upstream_status(exc)
            await self._answer_error(out, status, error_body(
                status, f"the teacher upstream failed: {exc.message}; the reservation was refunded",
                code=code, reasons=["UPSTREAM_ERROR"]))
        except ClientGone:
            out.status = 499
        except DistillgateError as exc:  # a user error surfacing from a component: report, never a bare 500
            status = 503 if isinstance(exc, StoreUnavailable) else 400 if exc.exit_code == 1 else 500
            await self._answer_error(out, status, error_body(status, str(exc), code="gateway_error"))
        except Exception:  # a bug: logged with its traceback, answered OpenAI-shaped, then re-raised
            _log.exception("internal error on %s %s", scope["method"], path)
            await self._answer_error(out, 500, error_body(
                500, "internal gateway error; the operator's log has the traceback", code="internal_error"))
            raise
        finally:
            self._handling -= 1
            self.metrics.answered(path if path in self._routes else "other", out.status,
                                  time.perf_counter() - started)

    async def _answer_error(self, out: Responder, status: int, body: bytes,
                            headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """JSON when nothing went out yet; a last SSE event when a stream is under way; nothing when complete."""
        if not out.started:
            try:
                await out.whole(status, body, [(b"content-type", b"application/json"), *headers])
            except ApiError as exc:  # the gate: the decision is not durable, so only that may be said
                out.gate = None
                await out.whole(exc.status, exc.body())
        elif not out.finished:
            await out.body(b"data: " + body + b"\n\n")

    # -- lifespan and reclaim -----------------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _tune_gc()
                self._reclaimer = asyncio.create_task(self._reclaim_loop())
                self._monitor_start = asyncio.create_task(self._start_monitor())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._reclaimer is not None:
                    self._reclaimer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._reclaimer
                if self._settling:  # settlements still on their way to the log
                    await asyncio.gather(*self._settling, return_exceptions=True)
                if self.cascade is not None:  # shadow comparisons still on their way to the store
                    await self.cascade.drain()
                await self.router.aclose()
                await self.monitor.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start_monitor(self) -> None:
        """Bring the extraction monitor up beside the server; /healthz says 503 "starting" until it is."""
        try:
            await self.monitor.start()
        except MonitorUnavailable as exc:  # requests answer 503 with the reason; the next one retries the start
            _log.error("the extraction monitor did not start: %s", exc.message)

    async def _reclaim_loop(self) -> None:
        # leases are renewed at least three times per TTL, whatever the reclaim interval
        tick = min(self.reclaim_interval_s, self.store.reservation_ttl_s / 3)
        while True:
            await asyncio.sleep(tick)
            try:
                if self.in_flight:  # renew the leases of requests still running, then refund the dead ones
                    await self.store.aextend(list(self.in_flight))
                self.metrics.reclaimed.inc(await self.store.areclaim_expired())
            except Exception:
                _log.exception("reclaim failed; retrying in %s s", self.reclaim_interval_s)

    # -- small GET routes ---------------------------------------------------------------------------------------
    async def _health(self, scope: Scope, receive: Receive, out: Responder) -> None:
        ready = self.monitor.status().ready  # ready only when the extraction monitor is
        await out.whole(200 if ready else 503, orjson.dumps({
            "status": "ok" if ready else "starting", "monitor_ready": ready, "log_size": self.store.size(),
            "policies": self.policies.ids()}))

    async def _metrics(self, scope: Scope, receive: Receive, out: Responder) -> None:
        await out.whole(200, self.metrics.render(), [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])

    async def _openapi_doc(self, scope: Scope, receive: Receive, out: Responder) -> None:
        await out.whole(200, self._openapi)

    async def _models(self, scope: Scope, receive: Receive, out: Responder) -> None:
        check = self.keys.check(_bearer(header_map(scope, self.max_header_bytes)))
        if check.status != "ok" or check.user is None:
            code = "AUTH_MISSING" if check.status == "missing" else (
                "KEY_REVOKED" if check.status == "revoked" else "AUTH_INVALID")
            raise ApiError(401, "a valid API key is required to list models: send Authorization: Bearer <key>",
                           code=code.lower(), reasons=[code])
        usable = [p for p in self.policies if any(
            (users := p.users_for(proj)) is None or check.user in users for proj in p.allowed_projects)]
        names = set(self.router.configured_models()) | set(await self.router.upstream_models())
        for p in usable:
            names.update(m for m in p.approved_models or [] if not any(ch in m for ch in "*?["))
        allowed = sorted(m for m in names if any(p.model_approved(m) for p in usable))
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "distillgate"} for m in allowed]
        for entry in data:  # a student's card: what it is, never where it is on disk
            if str(entry["id"]).startswith("student/") and str(entry["id"])[8:] in self.router.students:
                entry["card"] = self.router.student_card(str(entry["id"])[8:])
        await out.whole(200, orjson.dumps({"object": "list", "data": data}))

    # -- inference: the layers ----------------------------------------------------------------------------------
    async def _inference(self, route_name: str, scope: Scope, receive: Receive, out: Responder) -> None:
        ex = await self._parse(route_name, scope, receive)
        self._identify(ex)
        await self._judge(ex)
        started = time.perf_counter()  # a route's latency includes the student's classification
        if self.cascade is not None:  # no coroutine for the common case: a name no cascade routes
            await self._route(ex)
        ticket = await self._admit(ex, out)
        async with ticket:
            choice = ex.choice
            upstream = Answered(choice.answer) if choice is not None and choice.answer is not None \
                else self.router.http(ex.route) or await self.router.get(ex.route)  # type: ignore[arg-type]
            if ex.inb.stream:
                await self._forward_stream(ex, upstream, ticket, receive, out)
            else:
                await self._forward(ex, upstream, ticket, out)
        if choice is not None and self.cascade is not None and ex.teacher_route is not None:
            self.cascade.answered(choice, time.perf_counter() - started)
        if choice is not None and choice.shadow and self.cascade is not None and ex.teacher_route is not None:
            teacher = await self.router.get(ex.teacher_route)
            self.cascade.start_shadow(choice, _UPSTREAM_PATHS[ex.inb.route],
                                      {**ex.inb.body, "model": ex.teacher_route.upstream_model}, teacher.post_raw,
                                      ex.request_hash)

    async def _parse(self, route_name: str, scope: Scope, receive: Receive) -> Exchange:
        headers = header_map(scope, self.max_header_bytes)
        raw = await self.bodies.read(headers, receive)
        inb = parse_request(route_name, raw, headers)
        return Exchange(route_name, raw, headers, inb, sha256_hex(raw))

    def _identify(self, ex: Exchange) -> None:
        inb = ex.inb
        ex.check = check = self.keys.check(_bearer(ex.headers))
        routed = self.cascade is not None and inb.model in self.cascade
        try:  # a routed name is the teacher's route until the cascade chooses (after judge)
            ex.route = self.router.route(self.cascade.routes[inb.model].teacher if routed  # type: ignore[union-attr]
                                         else inb.model)
            ex.teacher_route = ex.route if routed else None
        except ApiError:
            if check.status == "ok":
                raise
            ex.route = Route("", inb.model)  # unauthenticated: the decision denies with 401 first
        ex.policy = self.policies.select(inb.project)

    async def _judge(self, ex: Exchange) -> None:
        inb, check, policy = ex.inb, ex.check, ex.policy
        assert check is not None and policy is not None
        hits = screen_hits(self.screens, inb.prompt)
        for hit in hits:
            self.metrics.screen_hits.labels(hit).inc()
        user = inb.user or check.user
        try:
            features = RequestFeatures.from_openai(inb.body, user=user, key_id=check.key_id, project=inb.project,
                                                   run=inb.run, output_type=inb.output_type,
                                                   declared_run_size=inb.run_size, prompt=inb.prompt)
        except UserError as exc:
            raise ApiError(400, exc.message, code="invalid_request") from exc
        try:  # the extraction signals for this request and its decision entry's ``extra`` (inline: one
            # coroutine less per request)
            signals, ex.extra = await self.monitor.observe(features)
        except MonitorUnavailable as exc:
            raise ApiError(503, f"{exc.message}; nothing was decided or forwarded",
                           code="extraction_monitor_unavailable") from exc
        # the same step `policy explain` and `policy test` run (gateway/judge.py)
        ex.request = gateway_request(inb, policy, auth=check.status, key_user=check.user, hits=hits,
                                     signals=signals)

    async def _route(self, ex: Exchange) -> None:
        """A routed model name: the student classifies first; its choice goes into the decision entry."""
        if self.cascade is None or ex.teacher_route is None or ex.check is None or ex.check.status != "ok":
            return
        ex.choice = choice = await self.cascade.choose(ex.inb.model, ex.inb.body, ex.inb.project, ex.request_hash,
                                                       ex.policy)
        logged = choice.log()
        if ex.policy is None or not ex.policy.audit.log_content:  # the label is answer content
            logged.pop("student_label")
        ex.extra = {**ex.extra, "route": logged}
        ex.answered_by = choice.answered_by
        if choice.taken == "student":
            ex.route = Route("student", self.cascade.routes[ex.inb.model].student)

    async def _admit(self, ex: Exchange, out: Responder) -> Ticket:
        """Decide, reserve and log; a denial is answered (after its commit) by raising. Returns the Ticket."""
        inb, policy, request = ex.inb, ex.policy, ex.request
        assert policy is not None and request is not None and ex.check is not None
        try:
            adm, durable = await self.store.aadmit_early(
                policy, request, request_hash=ex.request_hash, key_id=ex.check.key_id,
                content={"request": inb.body} if policy.audit.log_content else None, extra=ex.extra)
        except DistillgateError as exc:
            if not isinstance(exc, StoreUnavailable):
                raise
            raise ApiError(503, f"the decision log's database is unavailable ({exc.message}); nothing was "
                           "forwarded: retry later", code="decision_log_unavailable") from exc
        except Exception as exc:  # the decision log's transaction failed (disk full, I/O error): decide nothing
            raise ApiError(503, f"the decision could not be written to the decision log ({exc}); nothing was "
                           "forwarded: retry later", code="decision_log_unavailable") from exc
        ex.admission = adm
        out.gate = durable  # no byte of any answer before the decision is durable
        out.headers.append((b"x-distillgate-decision", str(adm.entry.index).encode()))
        decision = adm.decision
        self.metrics.decided(decision.allowed, decision.reasons)
        if not decision.allowed:
            raise ApiError(decision.status, f"denied by policy {decision.policy_id!r}: {decision.message}",
                           code=decision.reasons[0].lower() if decision.reasons else "policy_denied",
                           reasons=decision.reasons)
        body = inb.body
        assert ex.route is not None
        if ex.route.upstream_model != inb.model:
            body["model"] = ex.route.upstream_model
        if inb.max_tokens is None:  # the reservation counted the policy's default: the upstream must keep to it
            body["max_tokens"] = request.max_tokens
        return Ticket(self.store, adm, self.in_flight, self._refunded)

    def _refunded(self, outcome: str) -> None:
        self.metrics.labelled(self.metrics.refunds, outcome).inc()

    # -- forward --------------------------------------------------------------------------------------------------
    async def _forward(self, ex: Exchange, upstream: Upstream, ticket: Ticket, out: Responder) -> None:
        inb = ex.inb
        try:  # inline, not a helper coroutine: one coroutine less per request
            raw = await upstream.post_raw(_UPSTREAM_PATHS[inb.route], orjson.dumps(inb.body))
        except UpstreamError as exc:
            raise self._upstream_failed(ex, exc) from exc
        try:
            resp = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise self._upstream_failed(ex, UpstreamError(f"the upstream answer is not JSON: {exc}",
                                                          status=502)) from exc
        if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list):
            raise self._upstream_failed(ex, UpstreamError("the upstream answer has no 'choices' array", status=502))
        usage: dict[str, Any] = resp["usage"] if isinstance(resp.get("usage"), dict) else {}
        ticket.used = lambda: (usage.get("prompt_tokens"), usage.get("completion_tokens"))
        choices: list[dict[str, Any]] = resp["choices"]
        assert ex.policy is not None and ex.route is not None
        if ex.policy.hardening.round_logprobs is not None:
            _round_logprobs(choices, ex.policy.hardening.round_logprobs)
        resp["model"] = ex.answered_by or (inb.model if ex.route.upstream_model != inb.model
                                           else resp.get("model", inb.model))
        upstream_id = resp.get("id") if isinstance(resp.get("id"), str) else None
        final = await self._settle_and_stamp(ex, ticket, choices, resp["model"], usage, upstream_id, len(choices),
                                             lazy_ok=True)
        header = final.pop("_header")
        resp["distillgate"] = final
        await out.whole(200, orjson.dumps(resp), [(b"content-type", b"application/json"),
                                                  (_STAMP_HEADER, header.encode())])

    def _upstream_failed(self, ex: Exchange, exc: UpstreamError) -> UpstreamError:
        assert ex.route is not None
        self.metrics.upstream_errors.labels(ex.route.upstream_name, str(exc.status)).inc()
        return exc

    async def _forward_stream(self, ex: Exchange, upstream: Upstream, ticket: Ticket, receive: Receive,
                              out: Responder) -> None:
        inb, policy, route = ex.inb, ex.policy, ex.route
        assert policy is not None and route is not None
        body = inb.body
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        chat = inb.route == "chat"
        ex.assembly = asm = StreamAssembly(chat=chat)

        def used() -> tuple[int | None, int | None]:
            if not asm.content_chunks and asm.usage is None:
                return None, None
            usage = asm.usage or {}
            return usage.get("prompt_tokens", inb.prompt_tokens), usage.get("completion_tokens", asm.content_chunks)

        ticket.used = used
        contract = policy.output_contracts.get(inb.output_type or "")
        held: list[bytes] | None = [] if contract is not None and contract.enforcement == "block" else None
        digits = policy.hardening.round_logprobs
        renamed = route.upstream_model != inb.model

        async def emit(data: bytes) -> None:
            if held is not None:
                held.append(data)
                return
            if not out.started:
                await out.start(200, SSE_HEADERS)
            await out.body(data, more=True)

        async def pump() -> None:
            gen = upstream.stream_raw(_UPSTREAM_PATHS[inb.route], orjson.dumps(body))
            try:
                async for payload in gen:
                    try:
                        chunk = orjson.loads(payload)
                    except orjson.JSONDecodeError as exc:
                        raise UpstreamError(f"the upstream sent a chunk that is not JSON: {exc}", status=502) from exc
                    if not isinstance(chunk, dict):
                        raise UpstreamError("the upstream sent a chunk that is not an object", status=502)
                    if digits is not None or renamed:
                        if digits is not None:
                            _round_logprobs(chunk.get("choices"), digits)
                        if renamed and "model" in chunk:
                            chunk["model"] = ex.answered_by or inb.model
                        payload = orjson.dumps(chunk)
                    asm.add(chunk)
                    if not (chunk.get("usage") and not chunk.get("choices") and not inb.include_usage):
                        await emit(b"data: " + payload + b"\n\n")
            finally:
                await gen.aclose()

        pump_task = asyncio.create_task(pump())
        watch_task = asyncio.create_task(wait_disconnect(receive))
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump_task, watch_task):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch_task
        if not pump_task.done() or pump_task.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await pump_task
            raise ClientGone()
        exc = pump_task.exception()
        if isinstance(exc, UpstreamError):
            raise self._upstream_failed(ex, exc)
        if exc is not None:
            raise exc
        choices = asm.choices()
        model = asm.model if asm.model is not None else inb.model
        final = await self._settle_and_stamp(ex, ticket, choices, model, asm.usage or {}, asm.upstream_id,
                                             len(choices) or inb.n, lazy_ok=False,
                                             completion_fallback=asm.content_chunks)
        header = final.pop("_header")
        if held is not None:
            held_data, held = held, None
            for data in held_data:
                await emit(data)
        last: dict[str, Any] = {"id": asm.upstream_id or "", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": [], "distillgate": final}
        if not out.started:
            await out.start(200, [*SSE_HEADERS, (_STAMP_HEADER, header.encode())])
        await out.body(b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n")

    # -- settle and stamp -----------------------------------------------------------------------------------------
    async def _settle_and_stamp(self, ex: Exchange, ticket: Ticket, choices: list[dict[str, Any]], model: Any,
                                usage: dict[str, Any], upstream_id: str | None, records: int, *, lazy_ok: bool,
                                completion_fallback: int | None = None) -> dict[str, Any]:
        """One settlement and one stamp over the assembled answer; returns the ``distillgate`` block (with the
        stamp header value under ``_header``). A blocking contract violation settles, then answers 422."""
        inb, policy, adm = ex.inb, ex.policy, ex.admission
        assert policy is not None and adm is not None
        response_hash = answer_digest(choices, model)
        problems, enforcement = self._contract_problems(policy, inb.output_type, choices)
        reasons = ("OUTPUT_FORMAT_VIOLATION",) if problems else ()
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens", completion_fallback)
        blocked = bool(problems) and enforcement == "block"
        wait = not lazy_ok or self.settle_before_reply or blocked
        settling = ticket.settle(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, records=records,
            response_hash=response_hash, upstream_id=upstream_id, outcome="ok", reasons=reasons,
            extra=_settle_extra(policy, problems, enforcement, choices), lazy=not wait)
        if not wait:  # the decision is durable already; the settlement commits while the answer travels
            self._settling.add(settling)
            settling.add_done_callback(self._settled)
        if blocked:
            await _durable(settling)
            self._count_tokens(prompt_tokens, completion_tokens)
            raise ApiError(422, f"the teacher's answer broke the output contract of {inb.output_type!r}: "
                           + "; ".join(problems[:5]), code="output_format_violation",
                           reasons=["OUTPUT_FORMAT_VIOLATION"])
        # signed while the writer commits the settlement (its fsync runs without the GIL); nothing is sent before
        # the settlement is durable (awaited below, when this mode waits for it)
        stamp = issue_stamp(
            self.store.signer, entry_index=adm.entry.index, entry_hash=adm.entry.entry_hash,
            policy_id=adm.decision.policy_id, policy_hash=adm.decision.policy_hash, user=adm.entry.body.get("user"),
            project=inb.project, run=inb.run, model=inb.model, upstream_id=upstream_id,
            request_hash=ex.request_hash, response_hash=response_hash)
        settlement_index: int | None = None
        if wait:
            entry: LogEntry = await _durable(settling)
            settlement_index = entry.index
        self._count_tokens(prompt_tokens, completion_tokens)
        final: dict[str, Any] = {"stamp": stamp.as_dict(), "decision_index": adm.entry.index,
                                 "settlement_index": settlement_index, "flags": list(reasons)}
        if problems:
            final["contract_problems"] = problems
        if ex.choice is not None:
            final["route"] = ex.choice.summary()
        final["_header"] = stamp.header_value()
        return final

    def _contract_problems(self, policy: Policy, output_type: str | None,
                           choices: list[dict[str, Any]]) -> tuple[list[str], str | None]:
        contract = policy.output_contracts.get(output_type or "")
        if contract is None:
            return [], None
        problems: list[str] = []
        for c in choices:
            msg = c.get("message")
            text = msg.get("content") if isinstance(msg, dict) else c.get("text")
            problems += [f"choice {c.get('index', 0)}: {p}" for p in check_output(contract, text)]
        if problems:
            self.metrics.contract_violations.labels(output_type or "", contract.enforcement).inc()
        return problems, contract.enforcement

    def _settled(self, task: asyncio.Future[Any]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.metrics.settle_errors.inc()  # the reservation stays held; reclaim_expired refunds it later

    def _count_tokens(self, prompt_tokens: Any, completion_tokens: Any) -> None:
        if isinstance(prompt_tokens, int):
            self.metrics.settled_tokens("prompt", prompt_tokens)
        if isinstance(completion_tokens, int):
            self.metrics.settled_tokens("completion", completion_tokens)


#: the cyclic collector's first threshold while serving: each request allocates a few hundred containers, so
#: CPython's default (700) runs a young collection every couple of requests, most of it walking long-lived objects
GC_YOUNG_THRESHOLD = 20_000


def _tune_gc() -> None:
    """At startup: young collections run every GC_YOUNG_THRESHOLD allocations, not 700 (a process-wide setting:
    the gateway is its process's application). Cycles a request leaves (an exception's traceback) are still
    collected, a little later; nothing is frozen, so nothing is kept that a collection would free."""
    young, *older = gc.get_threshold()
    if young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, *older)


async def _durable(settling: Awaitable[LogEntry]) -> LogEntry:
    """The settlement's commit; a failed one (disk full, the database gone) is the 503 the gate gives for the
    decision committed with it, not an internal error (which would log a traceback and close the connection)."""
    try:
        return await settling
    except DistillgateError as exc:
        if not isinstance(exc, StoreUnavailable):
            raise
        raise ApiError(503, f"the decision log's database is unavailable ({exc.message}); nothing was answered: "
                       "retry later", code="decision_log_unavailable") from exc
    except Exception as exc:
        raise ApiError(503, f"the settlement could not be written to the decision log ({exc}); nothing was "
                       "answered: retry later", code="decision_log_unavailable") from exc


def _settle_extra(policy: Policy, problems: list[str], enforcement: str | None,
                  choices: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Contract problems, the examples a retrieval teacher was shown, and the answer itself when the policy has
    ``audit.log_content``."""
    extra: dict[str, Any] = {}
    if problems:
        extra["contract"] = problems[:10]
        extra["enforcement"] = enforcement
    shown = [c["shown_examples"] for c in choices if isinstance(c.get("shown_examples"), list)]
    if shown:  # a retrieval teacher's labelled examples, by pool id (teachers/retrieval.py)
        extra["shown_examples"] = [[str(x) for x in ids[:64]] for ids in shown]
    if policy.audit.log_content:
        extra["content"] = {"response": [
            {"index": c.get("index", 0), "text": (c.get("message") or {}).get("content") if "message" in c
             else c.get("text"), "finish_reason": c.get("finish_reason")} for c in choices]}
    return extra or None

