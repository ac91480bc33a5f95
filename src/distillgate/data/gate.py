"""The one check on every way out of a study, and on training and promotion: ``judge(store, policies, ...)``.

Dataset export, run bundle, student checkpoint export, training and evaluation for promotion all ask it. It reads
who signed off the dataset version (``signoff.signers``) and who started the run (``signoff.run_requester``),
builds one ``Request`` and lets ``decide()`` judge it (destinations, reviewer sign-off, project and user rules)
through ``Store.admit``, so the decision, allowed or denied, is a ``decision`` entry of the log with its reason codes.
A denial raises ``PolicyDenied``. Audit exports of the decision log (``ledger.export.export_run``, below this
package) are judged by the same ``decide()`` through ``Store.admit`` as an ``export`` with no data artifact: the
policy's destinations apply, a sign-off does not (the evidence must always be exportable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distillgate.data.signoff import run_requester, signers
from distillgate.errors import PolicyDenied
from distillgate.ledger.store import Admission, Store
from distillgate.policy.decision import Request
from distillgate.policy.model import Policy, PolicySet
from distillgate.policy.promotion_rules import GateEvidence, GateThresholds

HINTS = {
    "REVIEWER_REQUIRED": "have reviewers sign off the dataset version (`distillgate review sign-off` or the "
                         "review page's Sign off button)",
    "DESTINATION_NOT_APPROVED": "export under one of the policy's allowed_destinations",
    "PROMOTION_GATE_FAILED": "see the gate table of `distillgate promote`: improve the student or evaluate more items",
}


def judge(store: Store, policies: Policy | PolicySet, *, kind: str, user: str | None, project: str, run: str,
          version_id: str | None, destination: str | None = None, artifact: str | None = None,
          extra: Mapping[str, Any] | None = None, gates: tuple[GateEvidence, ...] = (),
          promotion: GateThresholds | None = None) -> Admission:
    """Judge and log one train / promote / export step of run ``run``; raise ``PolicyDenied`` when refused.

    ``gates``: for ``promote``, the measured evidence of the promotion gates (``evals.promotion``);
    ``promotion``: the project's own gates, judged with (and never looser than) the policy's."""
    signed = signers(store, project=project, run=run, version_id=version_id) if version_id else ()
    requester = run_requester(store, project=project, run=run) or user
    request = Request(user=user, project=project, run=run, output_type=None, kind=kind, destination=destination,
                      artifact=artifact, signed_off_by=signed, requester=requester, gates=gates,
                      promotion=promotion)
    admission = store.admit(policies, request, extra={"version_id": version_id, "artifact": artifact,
                                                      "signed_off_by": list(signed), **(extra or {})})
    decision = admission.decision
    if not decision.allowed:
        what = f"{kind} of {artifact}" if artifact else kind
        hint = "; ".join(HINTS[c] for c in decision.reasons if c in HINTS) or None
        raise PolicyDenied(f"{what} for run {run!r} denied by policy {decision.policy_id!r}: {decision.message} "
                           f"({', '.join(decision.reasons)}; decision-log index {admission.entry.index})",
                           decision.reasons, hint=hint)
    return admission
