"""Every reason code distillgate can write into a decision, in one place.

A reason code is an upper-snake string. ``blocking`` codes make a decision a denial; the others are recorded
flags. ``status`` is the HTTP status a denial carrying that code maps to (the highest-priority code wins: 401 over
429 over 403). ``docs/reason-codes.md`` is generated from this table (``python -m distillgate.policy.reasons``)
and a test fails when it drifts or when a code used anywhere in ``src/`` is missing here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasonInfo:
    description: str
    blocking: bool
    status: int = 403
    fix: str = ""


REASONS: dict[str, ReasonInfo] = {
    # --- allowed ---------------------------------------------------------------------------------------------
    "ALLOWED": ReasonInfo("Every rule of the governing policy is satisfied.", blocking=False, status=200),
    # --- identity ----------------------------------------------------------------------------------------------
    "AUTH_MISSING": ReasonInfo(
        "The request carried no API key.", True, 401, "send `Authorization: Bearer <key>` from `distillgate keys create`"
    ),
    "AUTH_INVALID": ReasonInfo("The API key is unknown.", True, 401, "create a key with `distillgate keys create`"),
    "KEY_REVOKED": ReasonInfo("The API key was revoked.", True, 401, "ask an operator for a new key"),
    "USER_MISMATCH": ReasonInfo(
        "`policy_user` differs from the user the API key belongs to.", True, 403, "use your own key and user name"
    ),
    "IDENTITY_INCOMPLETE": ReasonInfo(
        "The request lacks one of policy_user, policy_project_id, policy_run_id, policy_output_type.",
        True,
        400,
        "send X-Policy-User/-Project/-Run/-Output-Type headers or the same names in the body's metadata",
    ),
    # --- scope -------------------------------------------------------------------------------------------------
    "RUN_OWNED_BY_OTHER_PROJECT": ReasonInfo(
        "The run id (policy_run_id) already belongs to another project: a run belongs to the project of its first "
        "allowed request.", True, 409, "choose a new, unique policy_run_id for this project's run",
    ),
    "PROJECT_NOT_ALLOWED": ReasonInfo(
        "The project is not in the policy's allowed_projects.", True, 403, "use an allowed project or amend the policy"
    ),
    "USER_NOT_ALLOWED": ReasonInfo(
        "The user is not among the project's allowed users (project_users).", True, 403,
        "ask the policy owner to add the user to project_users",
    ),
    "OUTPUT_TYPE_BLOCKED": ReasonInfo(
        "The declared output type is in blocked_outputs.", True, 403, "this use is forbidden by policy"
    ),
    "OUTPUT_TYPE_NOT_ALLOWED": ReasonInfo(
        "The declared output type is not in allowed_outputs.", True, 403, "declare one of the allowed output types"
    ),
    "BLOCKED_CONTENT_DETECTED": ReasonInfo(
        "A prompt screen found content of a blocked output class (e.g. third-party credentials, a request to "
        "extract another provider's model).",
        True,
        403,
        "remove credentials / extraction instructions from the prompt",
    ),
    "MODEL_NOT_APPROVED": ReasonInfo(
        "The teacher model is not in approved_models.", True, 403, "use an approved teacher model"
    ),
    "DATASET_NOT_APPROVED": ReasonInfo(
        "The dataset source is not in approved_datasets.", True, 403, "use an approved dataset source"
    ),
    "DESTINATION_NOT_APPROVED": ReasonInfo(
        "The storage destination is outside allowed_destinations (and audit.export).", True, 403,
        "export under one of the policy's allowed destination prefixes",
    ),
    "REVIEWER_REQUIRED": ReasonInfo(
        "Training, evaluation for promotion or a data export needs sign-offs of the dataset version by "
        "review.min_reviewers distinct reviewers (not the requester); there are fewer.", True, 403,
        "have reviewers listed in review.reviewers sign off (`distillgate review sign-off` or the review page)",
    ),
    "REVIEWER_NOT_ALLOWED": ReasonInfo(
        "The reviewer is not listed for the project, or reviews their own run.", True, 403,
        "a different person listed in review.reviewers must review",
    ),
    "ACCOUNT_DISABLED": ReasonInfo(
        "The reviewer account is disabled.", True, 403, "ask an admin (`distillgate review user enable`)",
    ),
    "SIGNIN_LOCKED": ReasonInfo(
        "Too many failed sign-ins for the user name: it is locked for a while.", True, 429,
        "wait a minute, then try again; ask an admin if the password is lost",
    ),
    "QUEUES_NOT_EMPTY": ReasonInfo(
        "A sign-off was asked for while a review queue the policy names (review.empty_queues) holds unreviewed "
        "rows.", True, 409, "review the rows left in those queues, then sign off",
    ),
    # --- promotion --------------------------------------------------------------------------------------------
    "PROMOTION_GATE_FAILED": ReasonInfo(
        "A student was not promoted: at least one promotion gate of the policy (promotion.*) or of the project "
        "(promote.gates of `distillgate run`, never looser than the policy's) failed; the other codes of the "
        "decision say which.", True, 403,
        "see the gate table of `distillgate promote` or of the run report; improve the student or re-evaluate on "
        "more items",
    ),
    "RETENTION_BELOW_GATE": ReasonInfo(
        "The lower 95% bound of the student's accuracy retention is below promotion.min_retention.", True, 403,
        "train a better student, or evaluate on more items to narrow the interval",
    ),
    "REFUSAL_REGRESSION": ReasonInfo(
        "The upper 95% bound of the student's over- or under-refusal rate minus the teacher's exceeds "
        "promotion.max_over_refusal_increase / max_under_refusal_increase (XSTest-style suite).", True, 403,
        "include refusal cases in training (or fewer needless ones), then re-evaluate on a refusal suite",
    ),
    "HARMFUL_COMPLIANCE": ReasonInfo(
        "On the harmful-request suite the student complies with prompts the teacher refuses: the lower 95% bound "
        "of refusals kept is below promotion.min_harmful_refusal_kept.", True, 403,
        "train on the teacher's refusals; evaluate with `distillgate eval --suite harmful`",
    ),
    "PROMOTION_EVIDENCE_MISSING": ReasonInfo(
        "A gate the policy declares has no evidence: no evaluation of the suite it needs was found, or it has no "
        "interval.", True, 403,
        "evaluate the suite (`distillgate eval --suite xstest|harmful|...`) and pass its folder to `promote`",
    ),
    # --- volume ------------------------------------------------------------------------------------------------
    "TOKENS_PER_DAY_EXCEEDED": ReasonInfo(
        "The project's tokens_per_day quota (UTC day) would be exceeded.", True, 429,
        "wait for the next UTC day, lower max_tokens, or raise quotas.tokens_per_day",
    ),
    "USER_TOKENS_PER_DAY_EXCEEDED": ReasonInfo(
        "The user's tokens_per_day quota (UTC day) would be exceeded.", True, 429,
        "wait for the next UTC day or raise quotas.users.<user>.tokens_per_day",
    ),
    "RECORDS_PER_RUN_EXCEEDED": ReasonInfo(
        "The run's records_per_run quota would be exceeded (each choice of n counts).", True, 429,
        "start a new approved run or raise quotas.records_per_run",
    ),
    "MAX_TOKENS_EXCEEDED": ReasonInfo(
        "max_tokens is above the policy's quotas.max_tokens_per_request.", True, 403, "lower max_tokens"
    ),
    # --- API hardening -----------------------------------------------------------------------------------------
    "TOP_LOGPROBS_EXCEEDED": ReasonInfo(
        "top_logprobs is above hardening.max_top_logprobs.", True, 403, "ask for fewer top_logprobs"
    ),
    "LOGIT_BIAS_FORBIDDEN": ReasonInfo(
        "logit_bias is forbidden, or has more entries than hardening.max_logit_bias_entries.", True, 403,
        "drop logit_bias from the request",
    ),
    "EXTRACTION_SUSPECTED": ReasonInfo(
        "Traffic from this identity looks like model extraction; the policy denies it.", True, 403,
        "contact the governance team with the run's justification",
    ),
    "EXTRACTION_THROTTLED": ReasonInfo(
        "An extraction-abuse signal fired and the policy throttles it: the request is refused with 429.", True, 429,
        "slow down and spread the run's traffic, or ask the governance team to review the run",
    ),
    # --- recorded flags (never deny on their own) --------------------------------------------------------------
    "OUTPUT_FORMAT_VIOLATION": ReasonInfo(
        "The teacher's answer broke the output type's format contract (schema, label set or length).", False, 200
    ),
    "EXTRACTION_FLAGGED": ReasonInfo(
        "An extraction-abuse signal fired; the policy only flags it (evidence in the entry).", False, 200
    ),
    "REVIEW_REQUIRED": ReasonInfo(
        "An extraction-abuse signal fired; the policy asks a human to review the session.", False, 200
    ),
    "ROUTE_DRIFT": ReasonInfo(
        "A routed model name's shadow agreement (student vs teacher, per slice) fell below the evaluated level by "
        "more than its CI; with `shadow.stop_on_drift` the slice is answered by the teacher (docs/gateway.md).",
        False,
        200,
        "re-evaluate the student on current traffic and choose a new threshold (`distillgate route choose`)",
    ),
    "UPSTREAM_ERROR": ReasonInfo("The teacher upstream failed; the reservation was refunded.", False, 502),
    "CLIENT_DISCONNECTED": ReasonInfo(
        "The client went away before the answer was complete; the tokens used were charged.", False, 499
    ),
    "GATEWAY_ERROR": ReasonInfo(
        "The gateway failed after admitting the request (a bug, or the request was cancelled); the reservation was "
        "settled at once for what was known to be used and the error is in the settlement's `extra.error`.",
        False,
        500,
    ),
    "USAGE_OVERRUN": ReasonInfo(
        "The upstream reported more tokens than the reservation's upper bound; only the reservation was charged "
        "against the quota and the excess is recorded as `tokens_overrun` in the settlement.",
        False,
        200,
    ),
    "RESERVATION_EXPIRED": ReasonInfo(
        "A reservation was never settled (e.g. the gateway was killed) and was reclaimed.", False, 200
    ),
}

# Denial status precedence: authentication problems first, then bad requests, quota, then other denials.
_STATUS_PRIORITY = {401: 0, 400: 1, 429: 2, 403: 3, 409: 4}


def status_for(codes: tuple[str, ...]) -> int:
    """HTTP status for a set of reason codes (200 when none blocks)."""
    blocking = [REASONS[c].status for c in codes if REASONS[c].blocking]
    if not blocking:
        return 200
    return min(blocking, key=lambda s: _STATUS_PRIORITY.get(s, 9))


def render_markdown() -> str:
    lines = [
        "# Reason codes",
        "",
        "Generated from `src/distillgate/policy/reasons.py` by `python -m distillgate.policy.reasons`; a test keeps",
        "this file in step with the code. *Blocking* codes deny a request; the others are recorded flags.",
        "",
        "| code | blocking | HTTP | meaning | how to fix |",
        "| --- | --- | --- | --- | --- |",
    ]
    for code, info in REASONS.items():
        lines.append(
            f"| `{code}` | {'yes' if info.blocking else 'no'} | {info.status} | {info.description} | {info.fix} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
