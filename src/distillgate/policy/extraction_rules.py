"""The policy's ``extraction`` section: what each extraction-abuse signal does, and the ``Signal`` record itself.

A signal is computed by ``distillgate.extraction.ExtractionMonitor`` over a sliding window of one identity's
requests (scope ``user``, ``key``, ``project`` or ``run``) and handed to ``decide()`` inside ``Request.signals``.
``decide()`` compares its value with the policy's threshold and applies the rule's action:

* ``flag``     -> ``EXTRACTION_FLAGGED`` (recorded, never blocks)
* ``review``   -> ``REVIEW_REQUIRED`` (recorded, never blocks)
* ``throttle`` -> ``EXTRACTION_THROTTLED`` (denied with HTTP 429: slow down)
* ``deny``     -> ``EXTRACTION_SUSPECTED`` (denied with HTTP 403)

Every key is optional; a policy without an ``extraction`` section flags every signal with the defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillgate.policy.approved import ApprovedShape

SignalName = Literal[
    "volume", "template_sweep", "logit_bias_sweep", "logprob_harvest", "reasoning_elicitation",
    "key_coordination", "prompt_drift", "distribution_shift", "embedding_mmd",
]
Scope = Literal["user", "key", "project", "run", "cluster"]
Action = Literal["flag", "review", "throttle", "deny"]
SIGNAL_NAMES: tuple[str, ...] = get_args(SignalName)
SCOPES: tuple[Scope, ...] = ("user", "key", "project", "run")
# cluster: a project's identities that are still new to it (fewer than NEW_IDENTITY requests), taken together, so a
# wide hydra of many small keys adds up; only distribution_shift is computed for it by default
ALL_SCOPES: tuple[Scope, ...] = (*SCOPES, "cluster")
ACTION_CODES: dict[str, str] = {
    "flag": "EXTRACTION_FLAGGED",
    "review": "REVIEW_REQUIRED",
    "throttle": "EXTRACTION_THROTTLED",
    "deny": "EXTRACTION_SUSPECTED",
}


@dataclass(frozen=True)
class Signal:
    """One fired detector: ``value`` reached ``threshold`` over the last ``window`` requests of ``scope_id``."""

    name: str
    value: float
    threshold: float
    window: int
    scope: str
    scope_id: str
    evidence: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": round(float(self.value), 6), "threshold": self.threshold,
                "window": self.window, "scope": self.scope, "scope_id": self.scope_id, "evidence": self.evidence}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signal:
        return cls(str(data["name"]), float(data["value"]), float(data["threshold"]), int(data["window"]),
                   str(data["scope"]), str(data["scope_id"]), dict(data.get("evidence") or {}))

    def describe(self) -> str:
        return (f"{self.name}={self.value:.3g} >= {self.threshold:g} over the last {self.window} requests of "
                f"{self.scope} {self.scope_id!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SignalRule(_Strict):
    """Threshold, action and window of one signal; unset fields take the signal's default (``DEFAULT_RULES``)."""

    threshold: float | None = Field(default=None, gt=0, description="the signal fires when value >= threshold")
    action: Action = "flag"
    window: int | None = Field(default=None, ge=1, le=5000, description="requests per scope considered")
    min_requests: int | None = Field(default=None, ge=1, description="requests in the window before it may fire")
    scopes: tuple[Scope, ...] = Field(default=SCOPES, description="identities the signal is computed for")


DEFAULT_RULES: dict[str, SignalRule] = {
    # requests of a run / (declared run size, else 3x the project's median run)
    "volume": SignalRule(threshold=1.2, window=1, min_requests=1, scopes=("run",)),
    # share of the window's requests that have a near-twin (<= 3 words apart, not identical) in the window
    "template_sweep": SignalRule(threshold=0.6, window=200, min_requests=30),
    # distinct logit_bias patterns in the window
    "logit_bias_sweep": SignalRule(threshold=16, window=200, min_requests=1),
    # logprob requests repeating a prompt seen 4 times before in the window, or full single-token distributions (top_logprobs>=10, max_tokens<=1)
    "logprob_harvest": SignalRule(threshold=20, window=200, min_requests=1),
    # share of the window's requests eliciting reasoning traces on tasks unrelated to the others
    "reasoning_elicitation": SignalRule(threshold=0.3, window=200, min_requests=30),
    # keys whose own traffic is mostly suspicious, inside one user or project
    "key_coordination": SignalRule(threshold=3, window=1000, min_requests=30, scopes=("user", "project")),
    # share of embedded prompts whose nearest approved-traffic neighbour is farther than the reference's 1st pct.
    "prompt_drift": SignalRule(threshold=0.5, window=100, min_requests=20, scopes=("user", "key", "run")),
    # two-sample test: -log10 p of the window's count of prompt pieces outside the approved reference against the
    # reference's own held-out rate (exact binomial tail); at project scope it adds up slow mixing and many small
    # identities, and is attached only to requests whose own identity shows local evidence
    "distribution_shift": SignalRule(threshold=8.0, window=200, min_requests=4, scopes=ALL_SCOPES),
    # unbiased MMD^2 (RBF kernel) of the project's last embedded pieces against its reference, over the threshold
    # calibrated on same-distribution windows of the reference (value 1.0 = at the calibrated threshold)
    "embedding_mmd": SignalRule(threshold=1.0, window=200, min_requests=100, scopes=("project",)),
}


class ExtractionRules(_Strict):
    enabled: bool = Field(default=True, description="compute signals for this policy's projects")
    record_embeddings: bool = Field(default=False, description="store an int8-quantised prompt embedding per "
                                    "decision so that `audit scan` can re-run prompt_drift offline")
    signals: dict[SignalName, SignalRule] = Field(default_factory=dict)
    approved: dict[str, tuple[ApprovedShape, ...]] = Field(
        default_factory=dict, description="project -> its declared research shapes (distillgate.policy.approved)")

    @model_validator(mode="after")
    def _unique_templates(self) -> ExtractionRules:
        for project, shapes in self.approved.items():
            seen: dict[str, str] = {}
            for shape in shapes:
                for tid, text in shape.templates.items():
                    if seen.setdefault(tid, text) != text:
                        raise ValueError(f"extraction.approved.{project}: template id {tid!r} is declared twice "
                                         "with different texts; give each template its own id")
        return self

    def shapes(self, project: str | None) -> tuple[ApprovedShape, ...]:
        """The research shapes declared for ``project`` (empty: nothing declared, the signals' defaults judge)."""
        return self.approved.get(project or "", ())

    def rule(self, name: str) -> SignalRule:
        """The effective rule of ``name``: the policy's fields over the default."""
        base = DEFAULT_RULES[name]
        given = self.signals.get(name)  # type: ignore[call-overload]
        if given is None:
            return base
        return base.model_copy(update={k: getattr(given, k) for k in given.model_fields_set})

    def threshold(self, name: str) -> float:
        value = self.rule(name).threshold
        assert value is not None
        return value
