"""What a review site serves and who may use it: ``ReviewSite`` (validated settings) and ``Access`` (sign-in, judging).

Sign-in uses the gateway's API keys (``distillgate keys create --user alice``): the key names the reviewer. Whether
that reviewer may see the project is judged by the policy's ``decide()`` with a ``kind="review"`` request, on every
page and every action, so ``review.reviewers`` in the policy is the one place that says who reviews what.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distillgate.data.review import LEASE_TTL_S
from distillgate.errors import NotFoundError, UserError
from distillgate.gateway.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy.decision import Decision, Request, Usage, decide
from distillgate.policy.model import Policy, PolicySet

SESSION_TTL_S = 8 * 3600.0


@dataclass(frozen=True)
class ReviewSite:
    """Settings of one review site: one dataset working copy, reviewed for one project (and run)."""

    dataset: Path
    db: Path
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
class SignIn:
    user: str | None
    key_id: str | None
    decision: Decision | None
    problem: str | None = None


class Access:
    """Signs reviewers in with API keys and judges, through ``decide()``, whether they may review the project."""

    def __init__(self, site: ReviewSite, keys: KeyStore, log: Store) -> None:
        self.site = site
        self.keys = keys
        self.log = log

    def judge(self, user: str) -> Decision:
        site = self.site
        request = Request(user=user, project=site.project, run=site.run_id, output_type=None, kind="review",
                          requester=site.requester)
        return decide(site.policy, request, Usage())

    def sign_in(self, presented: str) -> SignIn:
        check = self.keys.check(presented.strip() or None)
        if check.status != "ok" or check.user is None:
            problem = {"missing": "enter your API key", "revoked": "this API key was revoked"}.get(
                check.status, "this API key is not known")
            return SignIn(None, None, None, problem)
        decision = self.judge(check.user)
        if not decision.allowed:
            self.log.append_event("review_access", {"user": check.user, "project": self.site.project,
                                                    "run": self.site.run_id, "decision": "deny",
                                                    "reasons": list(decision.reasons)})
            return SignIn(check.user, check.key_id, decision, decision.message)
        return SignIn(check.user, check.key_id, decision)

    def key_active(self, key_id: str, user: str) -> bool:
        return any(k.key_id == key_id and k.active for k in self.keys.list(user=user))
