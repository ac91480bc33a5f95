"""The review site as an ASGI app: ``create_app(site) -> Starlette``.

Routes (all server-rendered, Jinja2 with autoescaping; one small script for keyboard shortcuts):

    GET  /login                      sign-in forms (reviewer account + password, or API key)
    POST /login, POST /logout
    GET  /                           dataset overview: queues with progress, labels, filter reasons, edits, diff
    GET  /queues/{queue}/next        lease the next free row of the queue and show it
    GET  /rows/{row_id}              row view (leases the row for the reviewer when it is unreviewed)
    POST /rows/{row_id}/{action}     accept | correct | reject | skip
    POST /sign-off                   sign off the dataset (a signed ``signoff`` decision-log entry, see
                                     ``distillgate.data.signoff``): freezes it first when it changed since HEAD

Security: teacher outputs are rendered escaped, and the Content-Security-Policy allows only this site's own script
and stylesheet (no inline code), so markup inside an output can never run. Every POST carries the session's CSRF
token. Sessions are signed cookies (SameSite=Strict, HttpOnly) that expire ``session_ttl_s`` after sign-in; a
revoked key or a disabled account ends its sessions. Every page judges the reviewer again with ``decide()``; a reviewer the policy does
not allow sees no row of the dataset.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distillgate.data import review, signoff
from distillgate.data.store import WorkingCopy
from distillgate.errors import ConflictError, DistillgateError, NotFoundError, PolicyDenied, UserError
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.web.accounts import AccountStore
from distillgate.web.site import Access, ReviewSite
from distillgate.web.views import overview, row_view

HERE = Path(__file__).resolve().parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "base-uri 'none'; frame-ancestors 'none'")
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           b'fill="#1d4ed8"/><path d="M4 8.5l2.5 2.5L12 5" stroke="#fff" stroke-width="2" fill="none"/></svg>')
ACTIONS = ("accept", "correct", "reject", "skip")


class SecurityHeaders:
    """Adds CSP and friends to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ReviewApp:
    """The routes of one review site; holds the open key store and decision log."""

    def __init__(self, site: ReviewSite, keys: KeyStore, accounts: AccountStore, log: Store) -> None:
        self.site = site
        self.access = Access(site, keys, accounts, log)
        self.log = log
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True))
        self.env.globals["site"] = site
        self.env.filters["utc"] = lambda ts: datetime.fromtimestamp(float(ts), UTC).strftime("%H:%M:%S UTC")

    # -- rendering ---------------------------------------------------------------------------------------------
    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = request.session
        flash = session.pop("flash", None)
        html = self.env.get_template(name).render(
            user=session.get("user"), csrf=self.csrf(request), flash=flash, **context)
        return HTMLResponse(html, status_code=status)

    @staticmethod
    def csrf(request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = request.session["csrf"] = secrets.token_urlsafe(32)
        return token

    @staticmethod
    def csrf_ok(request: Request, form: Any) -> bool:
        sent = form.get("csrf")
        token = request.session.get("csrf")
        return isinstance(sent, str) and isinstance(token, str) and hmac.compare_digest(sent, token)

    def forbidden(self, request: Request, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status=403, title="Not allowed", message=message)

    # -- identity ----------------------------------------------------------------------------------------------
    def reviewer(self, request: Request) -> str | Response:
        """The signed-in reviewer allowed on this project, or the response to send instead."""
        session = request.session
        user, method, credential = session.get("user"), session.get("method"), session.get("credential")
        since = session.get("since")
        if not (isinstance(user, str) and isinstance(method, str) and isinstance(credential, str)
                and isinstance(since, int | float)):
            return RedirectResponse("/login", status_code=303)
        if (self.site.clock() - since > self.site.session_ttl_s
                or not self.access.still_valid(method, credential, user)):
            session.clear()
            session["flash"] = "Your session expired. Sign in again."
            return RedirectResponse("/login", status_code=303)
        decision = self.access.judge(user)
        if not decision.allowed:
            return self.forbidden(request, f"You may not review project {self.site.project}: {decision.message}")
        return user

    # -- pages -------------------------------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", title="Sign in")

    async def login(self, request: Request) -> Response:
        form = await request.form()
        if not self.csrf_ok(request, form):
            return self.forbidden(request, "The form expired or did not come from this site. Reload and try again.")
        name = str(form.get("user") or "")
        if "api_key" in form:
            result = await run_in_threadpool(self.access.sign_in, str(form.get("api_key") or ""))
        else:
            result = await run_in_threadpool(self.access.sign_in_password, name, str(form.get("password") or ""))
        if result.problem is not None or result.user is None or result.credential is None:
            return self.render(request, "login.html", status=result.status, title="Sign in", error=result.problem,
                               user_name=name[:100])
        request.session.clear()
        request.session.update({"user": result.user, "method": result.method, "credential": result.credential,
                                "since": self.site.clock(), "csrf": secrets.token_urlsafe(32)})
        return RedirectResponse("/", status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not self.csrf_ok(request, form):
            return self.forbidden(request, "The form expired or did not come from this site. Reload and try again.")
        user = request.session.get("user")
        if isinstance(user, str):
            await run_in_threadpool(self._with_wc, lambda wc: review.release_all(wc, user))
        request.session.clear()
        request.session["flash"] = "Signed out."
        return RedirectResponse("/login", status_code=303)

    async def home(self, request: Request) -> Response:
        user = self.reviewer(request)
        if isinstance(user, Response):
            return user
        view = await run_in_threadpool(self._with_wc, overview)
        signed = [so.as_dict() for so in signoff.signoffs(self.log, project=self.site.project, run=self.site.run_id)]
        return self.render(request, "overview.html", title=f"Review {view.name}", view=view, signoffs=signed,
                           policy_review=self.site.policy.review)

    async def sign_off(self, request: Request) -> Response:
        user = self.reviewer(request)
        if isinstance(user, Response):
            return user
        form = await request.form()
        if not self.csrf_ok(request, form):
            return self.forbidden(request, "The form expired or did not come from this site. Reload and try again.")
        method, credential = str(request.session.get("method")), request.session.get("credential")
        key_id = credential if method == "api_key" else None

        def sign(wc: WorkingCopy) -> tuple[Any, Any]:
            return signoff.sign_off(self.log, self.site.policy, wc, reviewer=user, method=method,
                                    credential_id=key_id, project=self.site.project, run=self.site.run_id)

        try:
            entry, version = await run_in_threadpool(self._with_wc, sign)
        except PolicyDenied as exc:
            return self.render(request, "error.html", status=409, title="Not signed off", message=exc.message)
        request.session["flash"] = (f"Signed off version {version.version_id[:16]} "
                                    f"(decision-log entry {entry.index}).")
        return RedirectResponse("/", status_code=303)

    async def next_in_queue(self, request: Request) -> Response:
        user = self.reviewer(request)
        if isinstance(user, Response):
            return user
        queue = request.path_params["queue"]
        skipped = frozenset(request.session.get("skipped", []))

        def pick(wc: WorkingCopy) -> str | None:
            row = review.claim_next(wc, queue, user, ttl_s=self.site.lease_ttl_s, now=self.site.clock(),
                                    skip=skipped)
            return row.row_id if row else None

        try:
            row_id = await run_in_threadpool(self._with_wc, pick)
        except NotFoundError as exc:
            return self.render(request, "error.html", status=404, title="No such queue", message=exc.message)
        if row_id is None:
            request.session["flash"] = f"Queue {queue} is done: no free rows left to review."
            return RedirectResponse("/", status_code=303)
        return RedirectResponse(f"/rows/{quote(row_id, safe='')}?queue={quote(queue, safe='')}", status_code=303)

    async def show_row(self, request: Request) -> Response:
        user = self.reviewer(request)
        if isinstance(user, Response):
            return user
        return await self._row_page(request, user, request.path_params["row_id"],
                                    request.query_params.get("queue", ""))

    async def _row_page(self, request: Request, user: str, row_id: str, queue: str, *, status: int = 200,
                        error: str | None = None, answer_error: str | None = None, draft: str | None = None,
                        draft_reason: str = "") -> Response:
        def load(wc: WorkingCopy) -> tuple[Any, str | None]:
            notice = None
            row = review.show(wc, row_id)
            if row.review_state == "unreviewed":
                try:
                    review.claim(wc, row_id, user, ttl_s=self.site.lease_ttl_s, now=self.site.clock())
                except ConflictError as exc:
                    notice = exc.message
            return row_view(wc, row_id), notice

        try:
            view, notice = await run_in_threadpool(self._with_wc, load)
        except NotFoundError as exc:
            return self.render(request, "error.html", status=404, title="No such row", message=exc.message)
        mine = view.lease is not None and view.lease.reviewer == user
        return self.render(request, "row.html", status=status, title=f"Row {row_id}", view=view, queue=queue,
                           notice=notice, error=error, can_act=notice is None, mine=mine, answer_error=answer_error,
                           draft=draft, draft_reason=draft_reason)

    async def act(self, request: Request) -> Response:
        user = self.reviewer(request)
        if isinstance(user, Response):
            return user
        row_id, action = request.path_params["row_id"], request.path_params["action"]
        form = await request.form()
        if not self.csrf_ok(request, form):
            return self.forbidden(request, "The form expired or did not come from this site. Reload and try again.")
        queue = str(form.get("queue") or "")
        if action not in ACTIONS:
            return self.render(request, "error.html", status=404, title="No such action",
                               message=f"unknown action {action!r}; use accept, correct or reject")
        if action == "skip":
            await run_in_threadpool(self._with_wc, lambda wc: review.release(wc, row_id, user))
            skipped = [*request.session.get("skipped", []), row_id][-200:]
            request.session["skipped"] = skipped
            return self._after(queue)
        try:
            version = int(str(form.get("row_version") or ""))
        except ValueError:
            return await self._row_page(request, user, row_id, queue, status=400,
                                        error="The form lost the row version. Reload the row and try again.")
        label = str(form.get("label") or "")
        reason = str(form.get("reason") or "").strip() or None
        answer = form.get("answer_json")  # the JSON editor of a structured task
        draft = answer if isinstance(answer, str) and action == "correct" else None

        def apply(wc: WorkingCopy) -> review.Verdict:
            if action == "accept":
                verdict = review.accept(wc, row_id, user, version, reason)
            elif draft is not None:
                verdict = review.correct_answer(wc, row_id, user, version, draft, reason or "")
            elif action == "correct":
                verdict = review.correct(wc, row_id, user, version, label, reason or "")
            else:
                verdict = review.reject(wc, row_id, user, version, reason or "")
            review.log_review(self.log, verdict, dataset=wc.config.name, project=self.site.project,
                              run=self.site.run_id)
            return verdict

        try:
            verdict = await run_in_threadpool(self._with_wc, apply)
        except ConflictError as exc:
            return await self._row_page(request, user, row_id, queue, status=409,
                                        error=f"Not saved: {exc.message}. The row below is the current version; "
                                              "check it and decide again.")
        except UserError as exc:
            if draft is not None:  # keep what the reviewer wrote, with the problem next to it
                return await self._row_page(request, user, row_id, queue, status=400, answer_error=f"Not saved: {exc}",
                                            draft=draft, draft_reason=reason or "")
            return await self._row_page(request, user, row_id, queue, status=400, error=f"Not saved: {exc}")
        past = {"accept": "Accepted", "correct": "Corrected", "reject": "Rejected"}[action]
        request.session["flash"] = f"{past} row {row_id} (now version {verdict.row.version})."
        return self._after(queue)

    @staticmethod
    def _after(queue: str) -> Response:
        if queue:
            return RedirectResponse(f"/queues/{quote(queue, safe='')}/next", status_code=303)
        return RedirectResponse("/", status_code=303)

    async def favicon(self, request: Request) -> Response:
        return Response(FAVICON, media_type="image/svg+xml")

    def _with_wc(self, fn: Callable[[WorkingCopy], Any]) -> Any:
        with WorkingCopy.open(self.site.dataset) as wc:
            return fn(wc)


def _error_pages(app: ReviewApp) -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    async def on_error(request: Request, exc: Exception) -> Response:
        message = exc.message if isinstance(exc, DistillgateError) else "Something went wrong on the server."
        return app.render(request, "error.html", status=500, title="Error", message=message)

    async def on_404(request: Request, exc: Exception) -> Response:
        return app.render(request, "error.html", status=404, title="Not found", message="There is no such page.")

    return {404: on_404, DistillgateError: on_error}


def create_app(site: ReviewSite) -> Starlette:
    """The review site for ``site``. Keys, reviewer accounts and the decision log live in ``site.db`` (closed on
    shutdown)."""
    keys = KeyStore(site.db)
    accounts = AccountStore(site.db)
    log = Store.open(site.db)
    routes_app = ReviewApp(site, keys, accounts, log)
    r = routes_app
    routes = [
        Route("/", r.home),
        Route("/login", r.login_page, methods=["GET"]),
        Route("/login", r.login, methods=["POST"]),
        Route("/logout", r.logout, methods=["POST"]),
        Route("/queues/{queue:str}/next", r.next_in_queue),
        Route("/rows/{row_id:str}", r.show_row),
        Route("/rows/{row_id:str}/{action:str}", r.act, methods=["POST"]),
        Route("/sign-off", r.sign_off, methods=["POST"]),
        Route("/favicon.svg", r.favicon),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(SessionMiddleware, secret_key=site.secret_key, session_cookie="distillgate_review",
                   max_age=int(site.session_ttl_s), same_site="strict", https_only=False),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        keys.close()
        accounts.close()
        log.close()

    return Starlette(routes=routes, middleware=middleware, exception_handlers=_error_pages(r), lifespan=lifespan)
