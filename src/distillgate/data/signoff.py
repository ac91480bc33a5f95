"""Sign-offs: a reviewer's signed statement that a dataset version of a run was reviewed, and the gate built on them.

A sign-off is a ``signoff`` entry of the decision log naming the reviewer, how they proved who they are (API key
id or reviewer account), the project and run, the dataset version (id and rows hash) and what was reviewed: the
verdict counts (accepted, corrected, rejected) and the rows still waiting in each queue. Its body is signed with the
store's Ed25519 key (``signature`` over the canonical JSON of the rest, ``key_id``), and a signed checkpoint of the
log is written right after it, so the entry is covered by a signed tree head as soon as it exists. ``verify``
checks the signature with the store's public key.

Who may sign off is judged by the same reviewer rules as every review (``decide()`` with ``kind="review"``: listed
in ``review.reviewers``, not the run's requester); a sign-off is refused with ``QUEUES_NOT_EMPTY`` while a queue
the policy names in ``review.empty_queues`` still holds unreviewed rows. ``signers(log, project, run, version)``
is what a gate hands ``decide()`` (``Request.signed_off_by``); the policy says how many distinct reviewers it needs
(``review.min_reviewers``) and ``REVIEWER_REQUIRED`` is the answer while there are fewer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from distillgate.data.review import queue_sizes
from distillgate.data.store import WorkingCopy
from distillgate.data.versions import Version
from distillgate.errors import PolicyDenied
from distillgate.ledger.signing import verify_json
from distillgate.ledger.store import LogEntry, Store
from distillgate.policy.model import Policy

KIND = "signoff"


@dataclass(frozen=True)
class SignOff:
    """One sign-off as read back from the log."""

    index: int
    reviewer: str
    method: str
    project: str | None
    run: str | None
    version_id: str
    signed_at: str
    reviewed: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "reviewer": self.reviewer, "method": self.method, "project": self.project,
                "run": self.run, "version_id": self.version_id, "signed_at": self.signed_at,
                "reviewed": self.reviewed}


def reviewed_summary(wc: WorkingCopy, version: Version) -> dict[str, Any]:
    """What a sign-off says was reviewed: verdict counts of the version and rows left in each queue."""
    rows = wc.rows()
    states: dict[str, int] = {}
    for row in version.rows:
        states[row.review_state] = states.get(row.review_state, 0) + 1
    return {"rows": len(version.rows), "verdicts": dict(sorted(states.items())),
            "queues_left": dict(sorted(queue_sizes(wc, rows=rows).items())),
            "edited": sum(1 for r in version.rows if r.edited)}


def unfinished_queues(policy: Policy, summary: Mapping[str, Any]) -> dict[str, int]:
    """The queues ``review.empty_queues`` names that still hold rows."""
    left: dict[str, int] = dict(summary.get("queues_left") or {})
    wanted = policy.review.empty_queues
    if "*" in wanted:
        return {q: n for q, n in left.items() if n}
    return {q: left[q] for q in wanted if left.get(q)}


def refuse_unfinished(store: Store, *, reviewer: str, project: str, run: str, left: Mapping[str, int]) -> None:
    """Log the refused sign-off (``review_access``, ``QUEUES_NOT_EMPTY``) and raise ``PolicyDenied``."""
    shown = ", ".join(f"{q} ({n})" for q, n in sorted(left.items()))
    store.append_event("review_access", {"user": reviewer, "project": project, "run": run, "action": "sign-off",
                                         "decision": "deny", "reasons": ["QUEUES_NOT_EMPTY"], "queues": dict(left)})
    raise PolicyDenied(f"sign-off refused: review queue(s) still hold rows: {shown}", ["QUEUES_NOT_EMPTY"],
                       hint="review the remaining rows (review.empty_queues of the policy), then sign off")


def record(store: Store, policy: Policy, *, reviewer: str, method: str, credential_id: str | None,
           project: str, run: str, version: Version, summary: Mapping[str, Any]) -> LogEntry:
    """Append the signed sign-off of ``version`` by ``reviewer`` (already judged allowed to review) and checkpoint.

    Raises ``PolicyDenied`` (``QUEUES_NOT_EMPTY``, logged as a ``review_access`` denial) while queues the policy
    names still hold rows.
    """
    left = unfinished_queues(policy, summary)
    if left:
        refuse_unfinished(store, reviewer=reviewer, project=project, run=run, left=left)
    body: dict[str, Any] = {
        "reviewer": reviewer, "user": reviewer, "method": method, "credential_id": credential_id,
        "project": project, "run": run, "version_id": version.version_id,
        "rows_sha256": version.manifest.get("rows_sha256"), "dataset": version.manifest.get("name"),
        "policy_id": policy.policy_id, "policy_hash": policy.content_hash,
        "signed_at": datetime.now(UTC).isoformat(timespec="seconds"), "reviewed": dict(summary),
        "key_id": store.signer.key_id,
    }
    body["signed_keys"] = sorted(body)  # what the signature covers, whatever else the log adds to the entry
    body["signature"] = store.signer.sign_json(body)
    entry = store.append_event(KIND, body)
    store.checkpoint()
    return entry


def sign_off(store: Store, policy: Policy, wc: WorkingCopy, *, reviewer: str, method: str,
             credential_id: str | None, project: str, run: str) -> tuple[LogEntry, Version]:
    """Sign off the working copy's current content as a frozen version: HEAD when nothing changed since it was
    frozen, else a new version frozen now (so the verdicts signed for are the ones trained on). The reviewer must
    already be judged allowed (``web.site.Access``)."""
    from distillgate.data.versions import HEAD, diff_rows, freeze, open_version

    head = open_version(wc.root) if (wc.root / HEAD).exists() else None
    rows = wc.rows()
    left = unfinished_queues(policy, {"queues_left": queue_sizes(wc, rows=rows)})
    if left:  # refused before anything is frozen
        refuse_unfinished(store, reviewer=reviewer, project=project, run=run, left=left)
    if head is None or diff_rows(head.rows, rows):
        head = freeze(wc, notes=f"frozen for the sign-off of {reviewer} (run {run})")
    return record(store, policy, reviewer=reviewer, method=method, credential_id=credential_id, project=project,
                  run=run, version=head, summary=reviewed_summary(wc, head)), head


def verify(entry_body: Mapping[str, Any], public_key_pem: str) -> bool:
    """Whether a sign-off entry's signature holds for its content (log fields like ``prev_hash`` excluded)."""
    keys = entry_body.get("signed_keys")
    signature = entry_body.get("signature")
    if not isinstance(keys, list) or not isinstance(signature, str) or any(k not in entry_body for k in keys):
        return False
    signed = {k: entry_body[k] for k in keys if k != "signed_keys"}
    signed["signed_keys"] = keys
    return verify_json(public_key_pem, signed, signature)


def signoffs(store: Store, *, project: str | None, run: str, version_id: str | None = None) -> Iterator[SignOff]:
    """The run's sign-offs whose signature verifies (of ``version_id`` when given), oldest first."""
    pem = store.signer.public_key_pem()
    for e in store.entries(run=run, kind=KIND, project=project):  # a run is keyed by (project, run)
        b = e.body
        if (project is not None and b.get("project") != project) or not verify(b, pem):
            continue
        if version_id is not None and b.get("version_id") != version_id:
            continue
        yield SignOff(e.index, str(b["reviewer"]), str(b.get("method")), b.get("project"), b.get("run"),
                      str(b["version_id"]), str(b.get("signed_at")), dict(b.get("reviewed") or {}))


def signers(store: Store, *, project: str | None, run: str, version_id: str) -> tuple[str, ...]:
    """Distinct reviewers who signed off ``version_id`` of the run (for ``Request.signed_off_by``)."""
    return tuple(sorted({s.reviewer for s in signoffs(store, project=project, run=run, version_id=version_id)}))


def run_requester(store: Store, *, project: str, run: str) -> str | None:
    """Who started the run: the user of its first allowed teacher call (None before any)."""
    for e in store.entries(run=run, kind="decision", project=project):
        b = e.body
        if b.get("project") == project and b.get("request_kind") == "inference" and b.get("decision") == "allow":
            user = b.get("user")
            return str(user) if user else None
    return None
