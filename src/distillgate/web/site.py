"""What a review site serves and who may use it: ``ReviewSite`` (validated settings) and ``Access`` (sign-in, judging).

Reviewers sign in with a reviewer account and its password (``distillgate review user add --user alice``) or with a
gateway API key (``distillgate keys create --user alice``); either names the reviewer. Whether that reviewer may see
the project is judged by the policy's ``decide()`` with a ``kind="review"`` request, on every page and every
action, so ``review.reviewers`` in the policy is the one place that says who reviews what, whatever the sign-in.

Every sign-in attempt is a ``review_signin`` event in the decision log (user name, method, outcome, failures in a
row; never the password or key); a reviewer the policy refuses is also a ``review_access`` event.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from distillgate.data.review import LEASE_TTL_S
from distillgate.errors import NotFoundError, UserError
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy.decision import Decision, Request, Usage, decide
from distillgate.policy.model import Policy, PolicySet
from distillgate.web.accounts import MAX_USER_CHARS, AccountStore

SESSION_TTL_S = 8 * 3600.0


@dataclass(frozen=True)
class ReviewSite:
    """Settings of one review site: one dataset working copy, reviewed for one project (and run)."""

    dataset: Path
    db: Path | str  # a SQLite file or a postgresql:// URL
    policies: PolicySet
    project: str
    run: str | None = None
    requester: str | None = None  # who started the run under review (the policy may forbid self-review)
    session_ttl_s: float = SESSION_TTL_S
    lease_ttl_s: float = LEASE_TTL_S
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if not (self.dataset / "dataset.yaml").exists():
            raise NotFoundError(f"{self.dataset} is not a dataset working copy (no dataset.yaml)",
                                hint="pass --dataset DIR of a working copy made by `distillgate dataset init`")
        if not self.project or not self.project.strip():
            raise UserError("a review site needs the project it reviews", hint="pass --project NAME")
        if self.project not in self.policy.allowed_projects:
            known = sorted({p for policy in self.policies for p in policy.allowed_projects})
            raise UserError(f"no policy allows project {self.project!r}, so nobody could review it",
                            hint=f"pass --project with one of {', '.join(known)}, or add it to a policy")
        if self.session_ttl_s <= 0 or self.lease_ttl_s <= 0:
            raise UserError("session and lease lifetimes must be positive",
                            hint="pass --session-ttl and --lease-ttl in seconds, e.g. 28800 and 300")

    @property
    def policy(self) -> Policy:
        return self.policies.select(self.project)

    @property
    def run_id(self) -> str:
        """The run reviews are recorded under (the dataset directory name unless ``run`` is given)."""
        return self.run or self.dataset.resolve().name


@dataclass(frozen=True)
class ReviewScope:
    """What a reviewer is judged for outside a site (the CLI): the policies, project, run and requester."""

    policies: PolicySet
    project: str
    run_id: str
    requester: str | None = None
    clock: Callable[[], float] = time.time

    @property
    def policy(self) -> Policy:
        return self.policies.select(self.project)


SignInMethod = Literal["password", "api_key"]
WRONG_PASSWORD = "wrong user name or password"


@dataclass(frozen=True)
class SignIn:
    """The result of a sign-in: ``credential`` is the key id (API key) or the account's session marker (password
    account: ``AccountStore.session_marker``, which a new password changes).

    ``status``: the HTTP status of a refusal (401 unknown credentials, 403 refused by the policy or disabled,
    429 locked after too many failures).
    """

    user: str | None
    method: SignInMethod
    credential: str | None
    decision: Decision | None
    problem: str | None = None
    status: int = 200
    reasons: tuple[str, ...] = ()  # reason codes of a refusal


class Access:
    """Signs reviewers in (password accounts or API keys) and judges, through ``decide()``, whether they may review.

    The one authorisation path for reviewers: the review site and the ``review`` CLI both call it. Every refusal is
    a ``review_access`` event of the decision log with its reason codes (``AUTH_MISSING``, ``AUTH_INVALID``,
    ``KEY_REVOKED``, ``ACCOUNT_DISABLED``, ``SIGNIN_LOCKED``, ``REVIEWER_NOT_ALLOWED``). The run's requester is the
    scope's, else the user of the run's first allowed teacher call in the log (no self-review either way).
    """

    def __init__(self, site: ReviewSite | ReviewScope, keys: KeyStore, accounts: AccountStore, log: Store) -> None:
        self.site = site
        self.keys = keys
        self.accounts = accounts
        self.log = log

    def requester(self) -> str | None:
        from distillgate.data.signoff import run_requester

        site = self.site
        return site.requester or run_requester(self.log, project=site.project, run=site.run_id)

    def judge(self, user: str) -> Decision:
        site = self.site
        request = Request(user=user, project=site.project, run=site.run_id, output_type=None, kind="review",
                          requester=self.requester())
        return decide(site.policy, request, Usage())

    def _signin_event(self, user: str | None, method: SignInMethod, outcome: str, **extra: object) -> None:
        self.log.append_event("review_signin", {"user": user, "method": method, "outcome": outcome,
                                                "project": self.site.project, "run": self.site.run_id, **extra})

    def _refused(self, user: str | None, method: SignInMethod, reasons: tuple[str, ...], problem: str,
                 status: int) -> SignIn:
        self.log.append_event("review_access", {"user": user, "method": method, "project": self.site.project,
                                                "run": self.site.run_id, "decision": "deny",
                                                "reasons": list(reasons)})
        return SignIn(None, method, None, None, problem, status, reasons)

    def _admit(self, user: str, method: SignInMethod, credential: str) -> SignIn:
        decision = self.judge(user)
        if not decision.allowed:
            self._signin_event(user, method, "not_allowed", reasons=list(decision.reasons))
            refused = self._refused(user, method, decision.reasons, decision.message, 403)
            return SignIn(user, method, credential, decision, decision.message, 403, refused.reasons)
        self._signin_event(user, method, "ok")
        return SignIn(user, method, credential, decision)

    def sign_in(self, presented: str) -> SignIn:
        """Sign in with an API key."""
        check = self.keys.check(presented.strip() or None)
        if check.status != "ok" or check.user is None:
            problem = {"missing": "enter your API key", "revoked": "this API key was revoked"}.get(
                check.status, "this API key is not known")
            code = {"missing": "AUTH_MISSING", "revoked": "KEY_REVOKED"}.get(check.status, "AUTH_INVALID")
            if check.status != "missing":
                self._signin_event(check.user, "api_key", f"{check.status}_key", key_id=check.key_id,
                                   reasons=[code])
            return self._refused(check.user, "api_key", (code,), problem, 401)
        return self._admit(check.user, "api_key", check.key_id or "")

    def sign_in_password(self, user: str, password: str) -> SignIn:
        """Sign in with a reviewer account; failures count towards the account's lockout."""
        name = user.strip()
        if not name or not password:
            return self._refused(name or None, "password", ("AUTH_MISSING",), "enter your user name and password",
                                 401)
        if len(name) > MAX_USER_CHARS or not name.isprintable():
            self._signin_event(None, "password", "bad_user_name", reasons=["AUTH_INVALID"])
            return self._refused(None, "password", ("AUTH_INVALID",), WRONG_PASSWORD, 401)
        check = self.accounts.check(name, password, now=self.site.clock())
        marker = self.accounts.session_marker(name) if check.status == "ok" else None
        if marker is not None:  # the session holds the password's marker: a new password ends it
            return self._admit(name, "password", marker)
        code = ("SIGNIN_LOCKED" if check.locked_for_s > 0 else
                "ACCOUNT_DISABLED" if check.status == "disabled" else "AUTH_INVALID")
        extra = {"failures": check.failures, "locked_for_s": round(check.locked_for_s), "reasons": [code]}
        self._signin_event(name, "password", {"unknown": "unknown_user", "wrong": "wrong_password"}.get(
            check.status, check.status), **extra)
        if check.locked_for_s > 0:
            wait = max(1, round(check.locked_for_s))
            problem = (f"too many failed sign-ins for {name!r}: sign-in is locked for {wait} s. "
                       "Wait, then try again (ask an admin if you forgot the password)")
            return self._refused(name, "password", (code,), problem, 429)
        if check.status == "disabled":
            return self._refused(name, "password", (code,),
                                 f"the reviewer account {name!r} is disabled; ask an admin", 403)
        return self._refused(name, "password", (code,), WRONG_PASSWORD, 401)

    def still_valid(self, method: str, credential: str, user: str) -> bool:
        """Whether a session's sign-in still holds: the key is not revoked, the account not disabled."""
        if method == "api_key":
            return any(k.key_id == credential and k.active for k in self.keys.list(user=user))
        if method == "password":
            marker = self.accounts.session_marker(user)
            return marker is not None and hmac.compare_digest(credential, marker)
        return False
