"""The gateway as a plain ASGI application (no framework on the hot path).

Per inference request, in this order: read the body (size-capped) → parse and validate → check the API key → run
the prompt screens → route the model → ``Store.aadmit`` (decide + reserve + log, durable before anything else) →
on denial answer the OpenAI-shaped error → forward → check the output contract → ``Store.asettle`` (durable) →
sign the provenance stamp → answer. Streaming answers settle when the stream ends, breaks, or the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from distillgate.errors import DistillgateError, UpstreamError, UserError
from distillgate.extraction import ExtractionMonitor, RequestFeatures
from distillgate.extraction.local import LocalMonitor
from distillgate.extraction.process import MonitorUnavailable
from distillgate.extraction.seam import Monitor
from distillgate.gateway.contracts import check_output
from distillgate.gateway.errors import ApiError, error_body
from distillgate.gateway.judge import gateway_request, screen_hits
from distillgate.gateway.keys import KeyStore
from distillgate.gateway.metrics import Metrics
from distillgate.gateway.openapi import openapi_document
from distillgate.gateway.parse import Inbound, parse_request
from distillgate.gateway.screens import Screen
from distillgate.gateway.stamps import STAMP_HEADER, issue_stamp, response_digest
from distillgate.gateway.upstreams import Route, Router, Upstream
from distillgate.ledger.canonical import sha256_hex
from distillgate.ledger.store import Admission, Store
from distillgate.policy import Policy, PolicySet
from distillgate.policy.extraction_rules import Signal

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_log = logging.getLogger("distillgate.gateway")
_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_GET_PATHS = {"/v1/models": "GET", "/healthz": "GET", "/metrics": "GET", "/openapi.json": "GET"}
_UPSTREAM_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


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


@dataclass
class _StreamState:
    upstream_id: str | None = None
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    content_chunks: int = 0
    error: UpstreamError | None = None
    sent_any: bool = False

    def choices(self) -> list[dict[str, Any]]:
        return [{"index": i, "text": "".join(self.texts.get(i, [])), "finish_reason": self.finish.get(i)}
                for i in sorted(set(self.texts) | set(self.finish))]


class Gateway:
    """The ASGI app. Build it with :func:`distillgate.gateway.server.build_gateway` or directly for tests."""

    def __init__(self, *, policies: PolicySet, store: Store, keys: KeyStore, router: Router,
                 screens: Sequence[Screen], max_body_bytes: int = 1 << 20, reclaim_interval_s: float = 30.0,
                 metrics: Metrics | None = None, settle_before_reply: bool = True,
                 monitor: Monitor | None = None) -> None:
        self.policies = policies
        #: extraction-abuse signals on every request (docs/extraction.md); the policy decides what they do
        self.monitor: Monitor = monitor if monitor is not None else LocalMonitor(ExtractionMonitor(policies))
        self.store = store
        self.keys = keys
        self.router = router
        self.screens = tuple(screens)
        self.max_body_bytes = max_body_bytes
        self.reclaim_interval_s = reclaim_interval_s
        self.metrics = metrics or Metrics()
        self.metrics.embed_backlog.set_function(lambda: self.monitor.status().backlog)
        self.metrics.embed_dropped.set_function(lambda: self.monitor.status().dropped)
        self.settle_before_reply = settle_before_reply
        self._reclaimer: asyncio.Task[None] | None = None
        self._monitor_start: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[Any]] = set()
        self._openapi = orjson.dumps(openapi_document())

    # -- ASGI entry ---------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        method = scope["method"]
        started = time.perf_counter()
        status = 500
        self.metrics.in_flight.inc()
        try:
            route = _PATHS.get(path)
            allowed_method = "POST" if route is not None else _GET_PATHS.get(path)
            if allowed_method is not None and method != allowed_method:
                raise ApiError(405, f"{path} accepts {allowed_method} only", code="method_not_allowed",
                               headers=[(b"allow", allowed_method.encode())])
            if route is not None:
                status = await self._inference(route, scope, receive, send)
            elif method == "GET" and path == "/v1/models":
                status = await self._models(scope, send)
            elif method == "GET" and path == "/healthz":  # ready only when the extraction monitor is
                ready = self.monitor.status().ready
                status = await _send_json(send, 200 if ready else 503, orjson.dumps({
                    "status": "ok" if ready else "starting", "monitor_ready": ready, "log_size": self.store.size(),
                    "policies": self.policies.ids()}))
            elif method == "GET" and path == "/metrics":
                status = 200
                await _send(send, 200, self.metrics.render(),
                            [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])
            elif method == "GET" and path == "/openapi.json":
                status = await _send_json(send, 200, self._openapi)
            else:
                raise ApiError(404, f"no route {method} {path}; see /openapi.json", code="not_found")
        except ApiError as exc:
            status = exc.status
            await _send_json(send, exc.status, exc.body(), exc.headers)
        except DistillgateError as exc:  # a user error surfacing from a component: report, never a bare 500
            status = 400 if exc.exit_code == 1 else 500
            await _send_json(send, status, error_body(status, str(exc), code="gateway_error"))
        except Exception:  # a bug: logged with its traceback, answered OpenAI-shaped, then re-raised
            status = 500
            _log.exception("internal error on %s %s", method, path)
            with contextlib.suppress(Exception):  # the response may have started already
                await _send_json(send, 500, error_body(500, "internal gateway error; the operator's log has "
                                                       "the traceback", code="internal_error"))
            raise
        finally:
            self.metrics.in_flight.dec()
            label = route_label(path)
            self.metrics.labelled(self.metrics.requests, label, str(status)).inc()
            self.metrics.labelled(self.metrics.latency, label).observe(time.perf_counter() - started)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
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
        while True:
            await asyncio.sleep(self.reclaim_interval_s)
            self.metrics.reclaimed.inc(await self.store.areclaim_expired())

    # -- /v1/models ---------------------------------------------------------------------------------------------
    async def _models(self, scope: Scope, send: Send) -> int:
        check = self.keys.check(_bearer(_headers(scope)))
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
        return await _send_json(send, 200, orjson.dumps({"object": "list", "data": data}))

    # -- inference ----------------------------------------------------------------------------------------------
    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > self.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes; send less",
                               code="request_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client disconnected while sending the body", code="client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes; send less",
                               code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _inference(self, route_name: str, scope: Scope, receive: Receive, send: Send) -> int:
        raw = await self._read_body(scope, receive)
        headers = _headers(scope)
        inb = parse_request(route_name, raw, headers)
        check = self.keys.check(_bearer(headers))
        hits = screen_hits(self.screens, inb.prompt)
        for hit in hits:
            self.metrics.screen_hits.labels(hit).inc()
        try:
            route = self.router.route(inb.model)
        except ApiError:
            if check.status == "ok":
                raise
            route = Route("", inb.model)  # unauthenticated: the decision below denies with 401 first
        policy = self.policies.select(inb.project)
        # the same step `policy explain` and `policy test` run (gateway/judge.py)
        request = gateway_request(inb, policy, auth=check.status, key_user=check.user, hits=hits)
        user = request.user
        try:
            features = RequestFeatures.from_openai(inb.body, user=user, key_id=check.key_id, project=inb.project,
                                                   run=inb.run, output_type=inb.output_type,
                                                   declared_run_size=inb.run_size, prompt=inb.prompt)
        except UserError as exc:
            raise ApiError(400, exc.message, code="invalid_request") from exc
        signals, extra = await self._observe(features)
        if signals:
            request = replace(request, signals=signals)
        request_hash = sha256_hex(raw)
        # The admission is returned as soon as it is decided and reserved; its commit (fsync) runs while an allowed
        # request is forwarded. Nothing reaches the client before `durable` resolved.
        try:
            adm, durable = await self.store.aadmit_early(
                self.policies, request, request_hash=request_hash, key_id=check.key_id,
                content={"request": inb.body} if policy.audit.log_content else None, extra=extra)
        except DistillgateError:
            raise
        except Exception as exc:  # the decision log's transaction failed (disk full, I/O error): decide nothing
            raise _log_unavailable(exc, "forwarded") from exc
        decision = adm.decision
        if not decision.allowed or inb.stream:
            await _made_durable(durable)
        self.metrics.labelled(self.metrics.decisions, "allow" if decision.allowed else "deny").inc()
        for code in decision.reasons:
            self.metrics.reasons.labels(code).inc()
        index_header = (b"x-distillgate-decision", str(adm.entry.index).encode())
        if not decision.allowed:
            raise ApiError(decision.status, f"denied by policy {decision.policy_id!r}: {decision.message}",
                           code=decision.reasons[0].lower() if decision.reasons else "policy_denied",
                           reasons=decision.reasons, headers=[index_header])
        assert adm.reservation_id is not None
        body = inb.body
        if route.upstream_model != inb.model:
            body["model"] = route.upstream_model
        try:
            try:
                upstream = await self.router.get(route)
            except ApiError:
                await self.store.asettle(adm.reservation_id, outcome="upstream_error")
                raise
            if inb.stream:
                return await self._stream(inb, route, upstream, adm, policy, request_hash, receive, send,
                                          index_header)
            return await self._complete(inb, route, upstream, adm, policy, request_hash, send, index_header,
                                        durable)
        except BaseException:
            with contextlib.suppress(BaseException):  # an error answer, too, waits for the durable decision
                await durable
            raise

    async def _observe(self, features: RequestFeatures) -> tuple[tuple[Signal, ...], dict[str, object]]:
        """The extraction signals for this request and its decision entry's ``extra``."""
        try:
            return await self.monitor.observe(features)
        except MonitorUnavailable as exc:
            raise ApiError(503, f"{exc.message}; nothing was decided or forwarded",
                           code="extraction_monitor_unavailable") from exc

    async def _fail_upstream(self, adm: Admission, route: Route, exc: UpstreamError,
                             index_header: tuple[bytes, bytes]) -> ApiError:
        assert adm.reservation_id is not None
        status, code = _upstream_status(exc)
        self.metrics.upstream_errors.labels(route.upstream_name, str(exc.status)).inc()
        await self.store.asettle(adm.reservation_id, outcome="timeout" if status == 504 else "upstream_error",
                                 extra={"error": exc.message[:500], "upstream_status": exc.status})
        return ApiError(status, f"the teacher upstream failed: {exc.message}; the reservation was refunded",
                        code=code, reasons=["UPSTREAM_ERROR"], headers=[index_header])

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

    async def _complete(self, inb: Inbound, route: Route, upstream: Upstream, adm: Admission, policy: Policy,
                        request_hash: str, send: Send, index_header: tuple[bytes, bytes],
                        durable: Awaitable[Admission]) -> int:
        assert adm.reservation_id is not None
        try:
            raw = await upstream.post_raw(_UPSTREAM_PATHS[inb.route], orjson.dumps(inb.body))
            resp = orjson.loads(raw)
            if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list):
                raise UpstreamError("the upstream answer has no 'choices' array", status=502)
        except orjson.JSONDecodeError as exc:
            raise await self._fail_upstream(adm, route, UpstreamError(f"the upstream answer is not JSON: {exc}",
                                                                      status=502), index_header) from exc
        except UpstreamError as exc:
            raise await self._fail_upstream(adm, route, exc, index_header) from exc
        choices: list[dict[str, Any]] = resp["choices"]
        usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
        prompt_tokens = usage.get("prompt_tokens") if usage else None
        completion_tokens = usage.get("completion_tokens") if usage else None
        response_hash = response_digest(choices)
        problems, enforcement = self._contract_problems(policy, inb.output_type, choices)
        reasons = ("OUTPUT_FORMAT_VIOLATION",) if problems else ()
        upstream_id = resp.get("id") if isinstance(resp.get("id"), str) else None
        wait_for_settlement = self.settle_before_reply or (problems and enforcement == "block")
        settling = self.store.asettle(
            adm.reservation_id, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            records=len(choices), response_hash=response_hash, upstream_id=upstream_id, outcome="ok",
            reasons=reasons, extra=_settle_extra(policy, problems, enforcement, choices),
            lazy=not wait_for_settlement)  # nobody waits: it may share the next decision's commit
        settlement_index: int | None = None
        if wait_for_settlement:
            settlement_index = (await settling).index
        else:  # the decision is durable already; the settlement commits while the answer travels
            task = asyncio.create_task(settling)
            self._settling.add(task)
            task.add_done_callback(self._settled)
        self._count_tokens(prompt_tokens, completion_tokens)
        if problems and enforcement == "block":
            raise ApiError(422, f"the teacher's answer broke the output contract of {inb.output_type!r}: "
                           + "; ".join(problems[:5]), code="output_format_violation",
                           reasons=["OUTPUT_FORMAT_VIOLATION"], headers=[index_header])
        if policy.hardening.round_logprobs is not None:
            _round_logprobs(choices, policy.hardening.round_logprobs)
        stamp = issue_stamp(
            self.store.signer, entry_index=adm.entry.index, entry_hash=adm.entry.entry_hash,
            policy_id=adm.decision.policy_id, policy_hash=adm.decision.policy_hash, user=adm.entry.body.get("user"),
            project=inb.project, run=inb.run, model=inb.model, upstream_id=upstream_id,
            request_hash=request_hash, response_hash=response_hash)
        resp["model"] = inb.model if route.upstream_model != inb.model else resp.get("model", inb.model)
        resp["distillgate"] = {"stamp": stamp.as_dict(), "decision_index": adm.entry.index,
                               "settlement_index": settlement_index, "flags": list(reasons),
                               **({"contract_problems": problems} if problems else {})}
        out = orjson.dumps(resp)
        await _made_durable(durable)
        await _send(send, 200, out, [_JSON, index_header, (STAMP_HEADER.encode(), stamp.header_value().encode())])
        return 200

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.metrics.settle_errors.inc()  # the reservation stays held; reclaim_expired refunds it later

    def _count_tokens(self, prompt_tokens: Any, completion_tokens: Any) -> None:
        if isinstance(prompt_tokens, int):
            self.metrics.labelled(self.metrics.tokens, "prompt").inc(prompt_tokens)
        if isinstance(completion_tokens, int):
            self.metrics.labelled(self.metrics.tokens, "completion").inc(completion_tokens)

    # -- streaming ----------------------------------------------------------------------------------------------
    async def _stream(self, inb: Inbound, route: Route, upstream: Upstream, adm: Admission, policy: Policy,
                      request_hash: str, receive: Receive, send: Send, index_header: tuple[bytes, bytes]) -> int:
        assert adm.reservation_id is not None
        body = inb.body
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        gen = upstream.stream_raw(_UPSTREAM_PATHS[inb.route], orjson.dumps(body))
        state = _StreamState()
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except UpstreamError as exc:
            await gen.aclose()
            raise await self._fail_upstream(adm, route, exc, index_header) from exc
        contract = policy.output_contracts.get(inb.output_type or "")
        buffering = contract is not None and contract.enforcement == "block"
        digits = policy.hardening.round_logprobs
        held: list[bytes] = []
        chat = inb.route == "chat"

        async def emit(data: bytes) -> None:
            if buffering:
                held.append(data)
                return
            if not state.sent_any:
                state.sent_any = True
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*_SSE_HEADERS, index_header]})
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def pump() -> None:
            try:
                payload = first
                while payload is not None:
                    chunk = orjson.loads(payload)
                    forward = self._absorb(chunk, state, chat)
                    if forward and not (chunk.get("usage") and not chunk.get("choices") and not inb.include_usage):
                        if digits is not None:
                            _round_logprobs(chunk.get("choices"), digits)
                            payload = orjson.dumps(chunk)
                        await emit(b"data: " + payload + b"\n\n")
                    try:
                        payload = await gen.__anext__()
                    except StopAsyncIteration:
                        payload = None
            except UpstreamError as exc:
                state.error = exc
            except orjson.JSONDecodeError as exc:
                state.error = UpstreamError(f"the upstream sent a chunk that is not JSON: {exc}", status=502)
            finally:
                await gen.aclose()

        pump_task = asyncio.create_task(pump())
        watch_task = asyncio.create_task(_wait_disconnect(receive))
        done, _ = await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        disconnected = watch_task in done and not pump_task.done()
        if disconnected:
            pump_task.cancel()
        else:
            watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump_task
        with contextlib.suppress(asyncio.CancelledError):
            await watch_task
        usage = state.usage or {}
        if disconnected or state.error is not None:
            used = state.content_chunks
            outcome = "client_disconnected" if disconnected else "upstream_error"
            if state.error is not None:
                self.metrics.upstream_errors.labels(route.upstream_name, str(state.error.status)).inc()
            await self.store.asettle(
                adm.reservation_id, prompt_tokens=usage.get("prompt_tokens", inb.prompt_tokens) if used else None,
                completion_tokens=usage.get("completion_tokens", used) if used else None, records=0,
                upstream_id=state.upstream_id, outcome=outcome,
                extra={"error": state.error.message[:500]} if state.error else None)
            if disconnected:
                return 499
            err = error_body(502, f"the teacher upstream failed mid-stream: {state.error.message if state.error else ''}"
                             "; the unused reservation was refunded", code="upstream_error",
                             reasons=["UPSTREAM_ERROR"])
            if state.sent_any:
                await send({"type": "http.response.body", "body": b"data: " + err + b"\n\n", "more_body": False})
                return 200
            await _send_json(send, 502, err, [index_header])
            return 502
        choices = state.choices()
        response_hash = response_digest(choices)
        problems, enforcement = self._contract_problems(policy, inb.output_type, choices)
        reasons = ("OUTPUT_FORMAT_VIOLATION",) if problems else ()
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens", state.content_chunks)
        entry = await self.store.asettle(
            adm.reservation_id, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            records=len(choices) or inb.n, response_hash=response_hash, upstream_id=state.upstream_id,
            outcome="ok", reasons=reasons,
            extra=_settle_extra(policy, problems, enforcement, choices))
        self._count_tokens(prompt_tokens, completion_tokens)
        if problems and enforcement == "block":
            raise ApiError(422, f"the teacher's answer broke the output contract of {inb.output_type!r}: "
                           + "; ".join(problems[:5]), code="output_format_violation",
                           reasons=["OUTPUT_FORMAT_VIOLATION"], headers=[index_header])
        buffering = False
        for data in held:
            await emit(data)
        stamp = issue_stamp(
            self.store.signer, entry_index=adm.entry.index, entry_hash=adm.entry.entry_hash,
            policy_id=adm.decision.policy_id, policy_hash=adm.decision.policy_hash, user=adm.entry.body.get("user"),
            project=inb.project, run=inb.run, model=inb.model, upstream_id=state.upstream_id,
            request_hash=request_hash, response_hash=response_hash)
        final: dict[str, Any] = {"id": state.upstream_id or "", "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": int(time.time()), "model": inb.model, "choices": [],
                 "distillgate": {"stamp": stamp.as_dict(), "decision_index": adm.entry.index,
                                 "settlement_index": entry.index, "flags": list(reasons),
                                 **({"contract_problems": problems} if problems else {})}}
        await emit(b"data: " + orjson.dumps(final) + b"\n\n")
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return 200

    @staticmethod
    def _absorb(chunk: dict[str, Any], state: _StreamState, chat: bool) -> bool:
        """Fold one chunk into the stream state; False for chunks not to forward."""
        if state.upstream_id is None and isinstance(chunk.get("id"), str):
            state.upstream_id = chunk["id"]
        if isinstance(chunk.get("usage"), dict):
            state.usage = chunk["usage"]
        for c in chunk.get("choices") or []:
            i = int(c.get("index", 0))
            piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
            if piece:
                state.texts.setdefault(i, []).append(piece)
                state.content_chunks += 1
            else:
                state.texts.setdefault(i, [])
            if c.get("finish_reason") is not None:
                state.finish[i] = c["finish_reason"]
        return True


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


def route_label(path: str) -> str:
    if path in _PATHS or path in ("/v1/models", "/healthz", "/metrics", "/openapi.json"):
        return path
    return "other"


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _made_durable(durable: Awaitable[Admission]) -> None:
    """Wait until the decision is committed; a failed commit answers 503 and nothing else."""
    try:
        await durable
    except Exception as exc:
        raise _log_unavailable(exc, "answered") from exc


def _log_unavailable(exc: Exception, nothing_was: str) -> ApiError:
    return ApiError(503, f"the decision could not be written to the decision log ({exc}); nothing was "
                    f"{nothing_was}: retry later", code="decision_log_unavailable")


async def _send(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, body: bytes,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> int:
    await _send(send, status, body, [_JSON, *headers])
    return status

