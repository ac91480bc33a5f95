from __future__ import annotations

import ast
import re
from pathlib import Path

from distillgate.gateway.judge import gateway_request
from distillgate.gateway.parse import parse_request
from distillgate.policy import REASONS, Request, Usage, decide, policy_from_data
from distillgate.policy.reasons import render_markdown, status_for

from _foundation_support import SEED, request

ROOT = Path(__file__).resolve().parent.parent
RICH = policy_from_data({
    **SEED,
    "project_users": {"internal-compression": ["alice", "bob"]},
    "approved_models": ["local/*", "gpt-teacher-1"],
    "approved_datasets": ["banking77*"],
    "allowed_destinations": ["file:///tmp/exports/"],
    "quotas": {"tokens_per_day": 1000, "records_per_run": 10, "max_tokens_per_request": 500,
               "users": {"bob": {"tokens_per_day": 100}}},
    "review": {"required": True, "reviewers": {"internal-compression": ["carol", "alice"]}},
    "hardening": {"max_top_logprobs": 5, "allow_logit_bias": False},
})


def test_allowed_request_carries_allowed_code_and_policy_identity() -> None:
    d = decide(RICH, request(), Usage())
    assert d.allowed and d.reasons == ("ALLOWED",) and d.status == 200
    assert d.policy_id == "ml-research-distillation" and d.policy_hash == RICH.content_hash
    assert d.message == "allowed" and d.details == () and d.as_dict()["decision"] == "allow"
    other = policy_from_data({**SEED, "policy_id": "other"})  # the kept "allowed" decision is per policy
    assert decide(other, request(), Usage()).policy_id == "other" and decide(RICH, request(), Usage()) == d


def test_every_applicable_reason_is_returned_not_just_the_first() -> None:
    d = decide(RICH, request(user="mallory", key_user="eve", output_type="third_party_model_extraction",
                             model="gpt-4o", max_tokens=900, top_logprobs=20, logit_bias_size=3,
                             dataset_source="scraped", screen_hits=frozenset({"credentialed_api_replication"})),
               Usage(tokens_today_project=900, records_run=10))
    assert not d.allowed
    assert set(d.reasons) == {
        "USER_MISMATCH", "USER_NOT_ALLOWED", "OUTPUT_TYPE_BLOCKED", "BLOCKED_CONTENT_DETECTED",
        "MODEL_NOT_APPROVED", "DATASET_NOT_APPROVED", "TOP_LOGPROBS_EXCEEDED", "LOGIT_BIAS_FORBIDDEN",
        "MAX_TOKENS_EXCEEDED", "TOKENS_PER_DAY_EXCEEDED", "RECORDS_PER_RUN_EXCEEDED",
    }
    assert len(d.details) == len(d.reasons)


def test_identity_codes_and_status_precedence() -> None:
    d = decide(RICH, request(auth="missing", user=None, run=None), Usage(tokens_today_project=10**6))
    assert {"AUTH_MISSING", "IDENTITY_INCOMPLETE", "TOKENS_PER_DAY_EXCEEDED"} <= set(d.reasons)
    assert d.status == 401
    assert decide(RICH, request(auth="revoked"), Usage()).reasons == ("KEY_REVOKED",)
    assert decide(RICH, request(auth="invalid"), Usage()).reasons == ("AUTH_INVALID",)
    assert decide(RICH, request(), Usage(tokens_today_project=999)).status == 429
    assert decide(RICH, request(project="moonshot"), Usage()).status == 403


def test_quota_edges_are_inclusive_of_the_limit() -> None:
    # needs prompt 5 + max 10 = 15 tokens
    assert decide(RICH, request(), Usage(tokens_today_project=985)).allowed
    assert not decide(RICH, request(), Usage(tokens_today_project=986)).allowed
    assert decide(RICH, request(n=2), Usage(records_run=8)).allowed
    assert decide(RICH, request(n=3), Usage(records_run=8)).reasons == ("RECORDS_PER_RUN_EXCEEDED",)
    d = decide(RICH, request(user="bob", key_user="bob", max_tokens=96), Usage(tokens_today_user=0))
    assert d.reasons == ("USER_TOKENS_PER_DAY_EXCEEDED",)  # 5 + 96 > bob's 100


def test_n_multiplies_the_token_reservation() -> None:
    r = request(max_tokens=100, n=4, prompt_tokens=20)
    assert r.tokens_requested == 420 and r.records_requested == 4


def test_output_type_not_in_allowed_list_is_distinct_from_blocked() -> None:
    assert decide(RICH, request(output_type="poems"), Usage()).reasons == ("OUTPUT_TYPE_NOT_ALLOWED",)
    assert decide(RICH, request(output_type="credentialed_api_replication"), Usage()).reasons == (
        "OUTPUT_TYPE_BLOCKED",)


def test_export_destinations() -> None:
    ok = request(kind="export", output_type=None, destination="file:///tmp/exports/run-1/")
    assert decide(RICH, ok, Usage()).allowed
    assert decide(RICH, request(kind="export", destination="s3://ai-governance/distillation/r1/"), Usage()).allowed
    bad = decide(RICH, request(kind="export", destination="s3://personal-bucket/x/"), Usage())
    assert bad.reasons == ("DESTINATION_NOT_APPROVED",)
    sneaky = decide(RICH, request(kind="export", destination="file:///tmp/exports/../elsewhere/"), Usage())
    assert not sneaky.allowed


def test_reviewer_rules() -> None:
    assert decide(RICH, request(kind="review", user="carol", requester="alice"), Usage()).allowed
    own = decide(RICH, request(kind="review", user="alice", requester="alice"), Usage())
    assert own.reasons == ("REVIEWER_NOT_ALLOWED",)
    stranger = decide(RICH, request(kind="review", user="dave", requester="alice"), Usage())
    assert stranger.reasons == ("REVIEWER_NOT_ALLOWED",)


def test_decide_is_pure() -> None:
    r, u = request(), Usage(tokens_today_project=3)
    assert decide(RICH, r, u) == decide(RICH, r, u)


def test_request_quick_equals_the_dataclass_constructor() -> None:
    # the gateway builds its Request with Request.quick (one __dict__ instead of 22 object.__setattr__ calls)
    values = dict(user="a", project="p", run="r", output_type="labels", model="m", max_tokens=16, prompt_tokens=9,
                  n=2, auth="revoked", key_user="b", top_logprobs=3, logit_bias_size=1,
                  screen_hits=frozenset({"x"}), kind="export", destination="file:///tmp/x", signed_off_by=("c",))
    for given in (values, {"user": None, "project": None, "run": None, "output_type": None}):
        quick, built = Request.quick(given), Request(**given)  # type: ignore[arg-type]
        assert quick == built and hash(quick) == hash(built) and repr(quick) == repr(built)
        assert vars(quick) == vars(built) and decide(RICH, quick, Usage()) == decide(RICH, built, Usage())
    inb = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
                        {"x-policy-project": "internal-compression", "x-policy-run": "r"})
    req = gateway_request(inb, RICH, auth="ok", key_user="alice", hits=frozenset({"h"}))
    assert vars(req).keys() == vars(request()).keys()  # every field set, and no other name
    assert req == Request(user="alice", project="internal-compression", run="r", output_type=None, model="m",
                          max_tokens=RICH.quotas.default_max_tokens, prompt_tokens=inb.prompt_tokens, n=1,
                          key_user="alice", screen_hits=frozenset({"h"}))


def test_status_for_unknown_mix() -> None:
    assert status_for(("ALLOWED", "OUTPUT_FORMAT_VIOLATION")) == 200
    assert status_for(("PROJECT_NOT_ALLOWED", "TOKENS_PER_DAY_EXCEEDED")) == 429


# --- docs cannot drift --------------------------------------------------------------------------------------------
REASON_LIKE = re.compile(
    r"^[A-Z]+(_[A-Z]+)*_(EXCEEDED|ALLOWED|BLOCKED|DETECTED|APPROVED|MISSING|INVALID|REVOKED|MISMATCH|INCOMPLETE|"
    r"FORBIDDEN|SUSPECTED|FLAGGED|REQUIRED|VIOLATION|ERROR|DISCONNECTED|EXPIRED)$"
)


def test_reason_code_docs_are_generated_from_the_table() -> None:
    doc = (ROOT / "docs" / "reason-codes.md").read_text()
    assert doc == render_markdown(), "run: python -m distillgate.policy.reasons > docs/reason-codes.md"
    for code, info in REASONS.items():
        assert info.description, f"{code} has no description"


def test_every_reason_code_used_in_the_source_is_documented() -> None:
    used: set[str] = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and REASON_LIKE.match(node.value):
                used.add(node.value)
    from distillgate.data.filters import REASONS as FILTER_REASONS  # dataset filter codes: docs/dataset.md

    undocumented = sorted(used - set(REASONS) - set(FILTER_REASONS))
    assert not undocumented, f"reason codes used but not in policy/reasons.py: {undocumented}"
    assert "PROJECT_NOT_ALLOWED" in used  # the scan itself works
