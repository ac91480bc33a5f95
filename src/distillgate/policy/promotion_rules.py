"""The policy's ``promotion`` section: the gates a student must pass to be promoted, and the ``GateEvidence`` record.

Evidence is measured outside the policy (``distillgate.evals.promotion`` reads it from the run's ``metrics.json``
files) and handed to ``decide()`` inside ``Request.gates`` for a ``promote`` request, the way extraction signals
are. ``judge_gates`` compares each declared gate's *confidence bound* with the policy's threshold, so a student is
promoted only when the whole interval clears the gate, not its point estimate:

==================  ==========================================  ========================  ==========================
gate                evidence (paired bootstrap over items)      passes when               failing code
==================  ==========================================  ========================  ==========================
``retention``       accuracy retention, student / teacher        low >= ``min_retention``  ``RETENTION_BELOW_GATE``
``over_refusal``    over-refusal rate, student - teacher         high <= ``max_over_...``  ``REFUSAL_REGRESSION``
``under_refusal``   under-refusal rate, student - teacher        high <= ``max_under_...`` ``REFUSAL_REGRESSION``
``harmful``         share of harmful prompts the teacher         low >= ``min_harmful_...`` ``HARMFUL_COMPLIANCE``
                    refuses that the student refuses too
==================  ==========================================  ========================  ==========================

A declared gate without evidence (no such suite was evaluated) fails with ``PROMOTION_EVIDENCE_MISSING``; every
failure also carries ``PROMOTION_GATE_FAILED``. A gate left ``null`` is not declared and is shown as skipped.
The run's reviewer sign-off, where ``review.required``, is judged by ``decide()`` as for training.

A project file may declare gates of its own (``promote.gates`` of ``distillgate run``): they are handed to
``decide()`` in ``Request.promotion`` and ``tightened`` with the policy's, gate by gate, so a project can make a
gate stricter or declare one the policy leaves open, and never loosen one the policy sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GateName = Literal["retention", "over_refusal", "under_refusal", "harmful"]
GATES: tuple[GateName, ...] = ("retention", "over_refusal", "under_refusal", "harmful")
GATE_CODES: dict[str, str] = {"retention": "RETENTION_BELOW_GATE", "over_refusal": "REFUSAL_REGRESSION",
                              "under_refusal": "REFUSAL_REGRESSION", "harmful": "HARMFUL_COMPLIANCE"}


_KEYS: dict[str, str] = {"retention": "min_retention", "over_refusal": "max_over_refusal_increase",
                         "under_refusal": "max_under_refusal_increase", "harmful": "min_harmful_refusal_kept"}
_LOWER_BOUND = ("retention", "harmful")  # gates on a lower bound (a minimum); the others cap an upper bound


class GateThresholds(BaseModel):
    """Thresholds of the promotion gates; ``null`` leaves a gate undeclared. A project's ``promote.gates``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_retention: float | None = Field(default=None, ge=0, le=2, description=(
        "lower 95% bound of accuracy retention (student/teacher) must reach this"))
    max_over_refusal_increase: float | None = Field(default=None, ge=0, le=1, description=(
        "upper bound of (student - teacher) over-refusal rate on safe prompts may not exceed this"))
    max_under_refusal_increase: float | None = Field(default=None, ge=0, le=1, description=(
        "upper bound of (student - teacher) under-refusal rate on unsafe prompts may not exceed this"))
    min_harmful_refusal_kept: float | None = Field(default=None, ge=0, le=1, description=(
        "lower bound of the share of teacher-refused harmful prompts the student also refuses"))


class PromotionRules(GateThresholds):
    """The policy's ``promotion`` section: the gates' thresholds, and whether routing needs a promotion."""

    required_for_routing: bool = Field(default=False, description=(
        "a gateway route answers this policy's requests with a student only while the student's signed promotion "
        "record (distillgate promote) verifies; otherwise its teacher answers (route reason not_promoted)"))

    def threshold(self, gate: str) -> float | None:
        value: float | None = getattr(self, _KEYS[gate])
        return value

    def tightened(self, other: GateThresholds | None) -> PromotionRules:
        """The stricter of ``self`` and ``other`` for every gate (an undeclared side never loosens the other)."""
        if other is None:
            return self
        strict: dict[str, float | None] = {}
        for gate, key in _KEYS.items():
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is None or theirs is None:
                strict[key] = mine if theirs is None else theirs
            else:
                strict[key] = max(mine, theirs) if gate in _LOWER_BOUND else min(mine, theirs)
        return self.model_copy(update=strict)

    @property
    def declared(self) -> tuple[str, ...]:
        return tuple(g for g in GATES if self.threshold(g) is not None)


@dataclass(frozen=True)
class GateEvidence:
    """One measured quantity with its interval, and where it was read (a metrics file)."""

    gate: str
    estimate: float | None
    low: float | None
    high: float | None
    n: int
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n,
                "source": self.source}


@dataclass(frozen=True)
class GateVerdict:
    gate: str
    status: Literal["pass", "fail", "skipped"]
    code: str | None  # the failing reason code
    threshold: float | None
    evidence: GateEvidence | None
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "status": self.status, "code": self.code, "threshold": self.threshold,
                "evidence": self.evidence.as_dict() if self.evidence else None, "why": self.why}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def judge_gates(rules: PromotionRules, evidence: tuple[GateEvidence, ...]) -> list[GateVerdict]:
    """One verdict per gate, in ``GATES`` order; pure."""
    found = {e.gate: e for e in evidence}
    verdicts: list[GateVerdict] = []
    for gate in GATES:
        limit = rules.threshold(gate)
        ev = found.get(gate)
        if limit is None:
            verdicts.append(GateVerdict(gate, "skipped", None, None, ev, "not declared in the policy"))
            continue
        if ev is None:
            verdicts.append(GateVerdict(gate, "fail", "PROMOTION_EVIDENCE_MISSING", limit, None,
                                        f"no evaluation measures {gate}: evaluate the suite it needs"))
            continue
        lower_is_bound = gate in _LOWER_BOUND
        bound = ev.low if lower_is_bound else ev.high
        if not _finite(bound) or ev.n == 0:
            verdicts.append(GateVerdict(gate, "fail", "PROMOTION_EVIDENCE_MISSING", limit, ev,
                                        f"{gate} has no confidence interval (n={ev.n}): evaluate more items"))
            continue
        assert bound is not None
        side = "lower" if lower_is_bound else "upper"
        ok = bound >= limit if lower_is_bound else bound <= limit
        cmp = (">=" if ok else "<") if lower_is_bound else ("<=" if ok else ">")
        why = f"{side} 95% bound {bound:.4g} {cmp} {limit:g} (estimate {ev.estimate:.4g}, n={ev.n})" \
            if _finite(ev.estimate) else f"{side} 95% bound {bound:.4g} {cmp} {limit:g} (n={ev.n})"
        verdicts.append(GateVerdict(gate, "pass" if ok else "fail", None if ok else GATE_CODES[gate], limit, ev,
                                    why))
    return verdicts
