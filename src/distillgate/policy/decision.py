"""``decide(policy, request, usage) -> Decision``: the only place a request is judged.

A pure function: no I/O, no clock, no state that changes a result (its one memo, of each policy's immutable
"allowed" Decision, hands out what the general path would build). It returns *every* reason code that applies
(not only the first), so a denied researcher sees all they must fix at once. Quota usage is passed in by the caller (the ledger reads it
inside the same transaction that records the reservation, which keeps quotas exact under concurrency).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from distillgate.destinations import url_allowed
from distillgate.policy.extraction_rules import ACTION_CODES, SIGNAL_NAMES, Signal
from distillgate.policy.model import Policy
from distillgate.policy.promotion_rules import GateEvidence, GateThresholds, judge_gates
from distillgate.policy.reasons import REASONS, status_for

AUTH_STATES = ("ok", "missing", "invalid", "revoked")
KINDS = ("inference", "export", "review", "dataset", "train", "promote")
# what leaves a study as data: each needs the policy's sign-off when review.required (an audit export of the
# decision log does not: the evidence itself must always be exportable to the governance destination)
SIGNED_ARTIFACTS = ("dataset", "bundle", "student")


@dataclass(frozen=True)
class Request:
    """What is asked, and by whom. Built by the gateway from headers/body, or from a request JSON file."""

    user: str | None
    project: str | None
    run: str | None
    output_type: str | None
    model: str | None = None
    max_tokens: int = 0
    prompt_tokens: int = 0
    n: int = 1
    auth: str = "ok"
    key_user: str | None = None
    top_logprobs: int | None = None
    logit_bias_size: int = 0
    screen_hits: frozenset[str] = field(default_factory=frozenset)
    kind: str = "inference"
    destination: str | None = None
    dataset_source: str | None = None
    requester: str | None = None  # for kind="review": who started the run under review
    artifact: str | None = None  # for kind="export": what leaves ("dataset", "bundle", "student", "audit")
    signed_off_by: tuple[str, ...] = ()  # for train / promote / export: who signed off the dataset version
    signals: tuple[Signal, ...] = ()  # extraction-abuse signals from distillgate.extraction.ExtractionMonitor
    gates: tuple[GateEvidence, ...] = ()  # for kind="promote": measured evidence (distillgate.evals.promotion)
    promotion: GateThresholds | None = None  # for kind="promote": the project's own gates (tighten the policy's)

    @classmethod
    def quick(cls, values: Mapping[str, Any]) -> Request:
        """``Request(**values)`` (``values`` maps field names to values), built without the frozen dataclass's
        ``__init__``, which sets each of the 22 fields through ``object.__setattr__`` (and matches each keyword):
        the instance's ``__dict__`` is set in one step, the defaults overlaid with ``values``. The gateway builds
        one per request; tests check that it equals ``Request(**values)``. It does not check the names (a test
        of every caller does)."""
        request = object.__new__(cls)
        object.__setattr__(request, "__dict__", {**_REQUEST_DEFAULTS, **values})
        return request

    @property
    def tokens_requested(self) -> int:
        return max(0, self.prompt_tokens) + max(0, self.max_tokens) * max(1, self.n)

    @property
    def records_requested(self) -> int:
        return max(1, self.n) if self.kind == "inference" else 0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Request:
        """Build from the ``policy explain`` request JSON (policy_user, policy_project_id, ...)."""
        from distillgate.errors import ConfigError, ConfigIssue

        known = {
            "policy_user", "policy_project_id", "policy_run_id", "policy_output_type", "model", "max_tokens",
            "messages", "prompt", "n", "top_logprobs", "logit_bias", "kind", "destination", "dataset_source",
            "requester", "prompt_tokens", "screen_hits",
        }
        issues = [ConfigIssue(k, f"unknown key {k!r}", f"allowed: {', '.join(sorted(known))}") for k in data if k not in known]
        for key in ("max_tokens", "n", "top_logprobs", "prompt_tokens"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                issues.append(ConfigIssue(key, f"must be a non-negative integer, got {value!r}", "fix the value"))
        if issues:
            raise ConfigError("request", issues)
        text = prompt_text(data)
        prompt_tokens = data.get("prompt_tokens")
        return cls(
            user=data.get("policy_user"),
            project=data.get("policy_project_id"),
            run=data.get("policy_run_id"),
            output_type=data.get("policy_output_type"),
            model=data.get("model"),
            max_tokens=int(data.get("max_tokens") or 0),
            prompt_tokens=int(prompt_tokens) if prompt_tokens is not None else estimate_tokens(text),
            n=int(data.get("n") or 1),
            top_logprobs=data.get("top_logprobs"),
            logit_bias_size=len(data.get("logit_bias") or {}),
            screen_hits=frozenset(data.get("screen_hits") or ()),
            kind=str(data.get("kind") or "inference"),
            destination=data.get("destination"),
            dataset_source=data.get("dataset_source"),
            requester=data.get("requester"),
        )


#: every field of ``Request`` with its default (``None`` for the four without one): ``Request.quick`` starts from it;
#: every default is immutable, so instances may share them
def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    return None if f.default_factory is MISSING else f.default_factory()


_REQUEST_DEFAULTS: dict[str, Any] = {f.name: _default(f) for f in fields(Request)}


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text of a chat ``messages`` list or a completions ``prompt``, concatenated."""
    parts: list[str] = []
    for message in body.get("messages") or []:
        if type(message) is not dict and not isinstance(message, Mapping):  # a dict first: the ABC check is slow
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(c.get("text", "")) for c in content if isinstance(c, Mapping))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts.extend(p for p in prompt if isinstance(p, str))
    return "\n".join(parts)


def estimate_tokens(text: str) -> int:
    """A cheap upper-ish estimate of prompt tokens (≈4 characters per token, plus chat overhead)."""
    return len(text) // 4 + 8 if text else 0


@dataclass(frozen=True)
class Usage:
    """What the store knows when it judges: consumption so far (held reservations included), and which project
    owns the request's run (``None`` while no project has made an allowed request in it)."""

    tokens_today_project: int = 0
    tokens_today_user: int = 0
    records_run: int = 0
    run_project: str | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: tuple[str, ...]
    policy_id: str
    policy_hash: str
    status: int
    message: str
    details: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "decision": "allow" if self.allowed else "deny",
            "reasons": list(self.reasons),
            "policy_id": self.policy_id,
            "policy_hash": self.policy_hash,
            "status": self.status,
            "message": self.message,
            "details": list(self.details),
        }


def decide(policy: Policy, request: Request, usage: Usage) -> Decision:
    """Judge ``request`` under ``policy`` given ``usage``; every applicable reason code is returned."""
    found: list[tuple[str, str]] = []  # (code, specific explanation)

    def add(code: str, detail: str) -> None:
        found.append((code, detail))

    # identity
    if request.auth == "missing":
        add("AUTH_MISSING", "no API key was sent")
    elif request.auth == "invalid":
        add("AUTH_INVALID", "the API key is not known")
    elif request.auth == "revoked":
        add("KEY_REVOKED", "the API key was revoked")
    elif request.auth != "ok":
        add("AUTH_INVALID", f"unknown auth state {request.auth!r}")
    if request.key_user is not None and request.user is not None and request.key_user != request.user:
        add("USER_MISMATCH", f"policy_user {request.user!r} but the key belongs to {request.key_user!r}")
    if request.kind == "inference" and not (request.user and request.project and request.run
                                            and request.output_type):
        missing = [
            name for name, value in (
                ("policy_user", request.user), ("policy_project_id", request.project),
                ("policy_run_id", request.run), ("policy_output_type", request.output_type),
            ) if not value
        ]
        add("IDENTITY_INCOMPLETE", f"missing {', '.join(missing)}")

    # scope
    if request.run and request.project and usage.run_project is not None and usage.run_project != request.project:
        add("RUN_OWNED_BY_OTHER_PROJECT", f"run {request.run!r} belongs to project {usage.run_project!r}, not "
            f"{request.project!r}")
    if request.project:
        if request.project not in policy.allowed_projects:
            add("PROJECT_NOT_ALLOWED", f"project {request.project!r} is not in allowed_projects of policy "
                f"{policy.policy_id!r} (allowed: {', '.join(policy.allowed_projects)})")
        else:
            users = policy.users_for(request.project)
            if users is not None and request.user is not None and request.user not in users \
                    and request.kind != "review":  # reviewers are governed by review.reviewers
                add("USER_NOT_ALLOWED", f"user {request.user!r} may not use project {request.project!r} "
                    f"(allowed users: {', '.join(users)})")
    if request.output_type:
        if request.output_type in policy.blocked_outputs:
            add("OUTPUT_TYPE_BLOCKED", f"output type {request.output_type!r} is blocked by policy {policy.policy_id!r}")
        elif request.output_type not in policy.allowed_outputs:
            add("OUTPUT_TYPE_NOT_ALLOWED", f"output type {request.output_type!r} is not in allowed_outputs "
                f"(allowed: {', '.join(policy.allowed_outputs)})")
    screened = sorted(hit for hit in request.screen_hits if hit in policy.blocked_outputs) \
        if request.screen_hits else ()
    if screened:
        add("BLOCKED_CONTENT_DETECTED", f"the prompt matches blocked class(es): {', '.join(screened)}")
    if request.model and not policy.model_approved(request.model):
        add("MODEL_NOT_APPROVED", f"model {request.model!r} is not in approved_models "
            f"({', '.join(policy.approved_models or [])})")
    if request.dataset_source and not policy.dataset_approved(request.dataset_source):
        add("DATASET_NOT_APPROVED", f"dataset {request.dataset_source!r} is not in approved_datasets "
            f"({', '.join(policy.approved_datasets or [])})")
    if request.destination is not None and not url_allowed(request.destination, policy.destinations()):
        add("DESTINATION_NOT_APPROVED", f"destination {request.destination!r} is not under an allowed prefix "
            f"({', '.join(policy.destinations()) or 'none configured'})")

    # review approval
    if request.kind == "review":
        reviewers = policy.review.reviewers_for(request.project)
        if reviewers is not None and request.user not in reviewers:
            add("REVIEWER_NOT_ALLOWED", f"{request.user!r} is not a reviewer of project {request.project!r} "
                f"(reviewers: {', '.join(reviewers)})")
        if request.requester is not None and request.user == request.requester:  # never one's own run
            add("REVIEWER_NOT_ALLOWED", f"{request.user!r} cannot review their own run")

    # sign-off: training on, promoting, or exporting a study's data needs enough distinct allowed reviewers
    if policy.review.required and (request.kind in ("train", "promote")
                                   or (request.kind == "export" and request.artifact in SIGNED_ARTIFACTS)):
        reviewers = policy.review.reviewers_for(request.project)
        valid = sorted({who for who in request.signed_off_by
                        if (reviewers is None or who in reviewers) and who != request.requester})
        need = policy.review.min_reviewers
        if len(valid) < need:
            add("REVIEWER_REQUIRED", f"{request.kind} of run {request.run!r} needs sign-offs of its dataset version "
                f"by {need} distinct reviewer(s) of project {request.project!r}; signed off by "
                f"{', '.join(valid) or 'nobody'}")

    # promotion gates: the policy's thresholds against the evaluation's confidence bounds, when a student itself is
    # promoted (artifact "student"); the pipeline's check before it evaluates for promotion has no evidence yet
    if request.kind == "promote" and request.artifact == "student":
        gates = policy.promotion.tightened(request.promotion)
        failed = [v for v in judge_gates(gates, request.gates) if v.status == "fail"]
        for verdict in failed:
            add(verdict.code or "PROMOTION_GATE_FAILED", f"gate {verdict.gate}: {verdict.why}")
        if failed:
            add("PROMOTION_GATE_FAILED", f"{len(failed)} promotion gate(s) failed: "
                f"{', '.join(v.gate for v in failed)}")

    # API hardening
    hardening = policy.hardening
    if request.top_logprobs is not None and hardening.max_top_logprobs is not None \
            and request.top_logprobs > hardening.max_top_logprobs:
        add("TOP_LOGPROBS_EXCEEDED", f"top_logprobs={request.top_logprobs} > {hardening.max_top_logprobs}")
    if request.logit_bias_size:
        if not hardening.allow_logit_bias:
            add("LOGIT_BIAS_FORBIDDEN", "logit_bias is forbidden by this policy")
        elif hardening.max_logit_bias_entries is not None and request.logit_bias_size > hardening.max_logit_bias_entries:
            add("LOGIT_BIAS_FORBIDDEN", f"logit_bias has {request.logit_bias_size} entries "
                f"> {hardening.max_logit_bias_entries}")

    # extraction-abuse signals: the policy's threshold and action decide
    rules = policy.extraction
    if rules.enabled:
        for signal in request.signals:
            if signal.name not in SIGNAL_NAMES:
                continue
            threshold = rules.threshold(signal.name)
            if signal.value >= threshold:
                add(ACTION_CODES[rules.rule(signal.name).action], f"{signal.name}={signal.value:.3g} >= {threshold:g} "
                    f"over the last {signal.window} requests of {signal.scope} {signal.scope_id!r}")

    # volume
    quotas = policy.quotas
    if request.kind == "inference":
        if quotas.max_tokens_per_request is not None and request.max_tokens > quotas.max_tokens_per_request:
            add("MAX_TOKENS_EXCEEDED", f"max_tokens={request.max_tokens} > {quotas.max_tokens_per_request}")
        need = request.tokens_requested
        if quotas.tokens_per_day is not None and usage.tokens_today_project + need > quotas.tokens_per_day:
            add("TOKENS_PER_DAY_EXCEEDED", f"project has used {usage.tokens_today_project} of "
                f"{quotas.tokens_per_day} tokens today (UTC); this request needs up to {need}")
        user_limit = quotas.tokens_per_day_for(request.user)
        if user_limit is not None and usage.tokens_today_user + need > user_limit:
            add("USER_TOKENS_PER_DAY_EXCEEDED", f"user has used {usage.tokens_today_user} of {user_limit} "
                f"tokens today (UTC); this request needs up to {need}")
        records = request.records_requested
        if quotas.records_per_run is not None and usage.records_run + records > quotas.records_per_run:
            add("RECORDS_PER_RUN_EXCEEDED", f"run has {usage.records_run} of {quotas.records_per_run} records; "
                f"this request adds {records}")

    if not found:  # the common case: allowed with nothing to note, one Decision per policy (it is immutable)
        return _allowed(policy)
    codes = tuple(dict.fromkeys(code for code, _ in found))
    allowed = not any(REASONS[c].blocking for c in codes)
    if allowed:
        codes = ("ALLOWED", *codes)
        message = "allowed"
    else:
        message = "; ".join(detail for _, detail in found)
    return Decision(
        allowed=allowed,
        reasons=codes,
        policy_id=policy.policy_id,
        policy_hash=policy.content_hash,
        status=status_for(codes),
        message=message,
        details=tuple(f"{code}: {detail}" for code, detail in found),
    )


#: the decision "allowed, nothing to note" of each policy (by id and content hash) decide has judged
_ALLOWED: dict[tuple[str, str], Decision] = {}


def _allowed(policy: Policy) -> Decision:
    key = (policy.policy_id, policy.content_hash)
    decision = _ALLOWED.get(key)
    if decision is None:
        decision = Decision(allowed=True, reasons=("ALLOWED",), policy_id=policy.policy_id,
                            policy_hash=policy.content_hash, status=status_for(("ALLOWED",)), message="allowed")
        if len(_ALLOWED) < 256:  # a few policies per process; never an unbounded memo
            _ALLOWED[key] = decision
    return decision
