"""``distillgate policy test DIR``: table-driven policy tests, like ``opa test``.

A test file (``*.yaml``/``*.json`` in DIR, or any file named ``*_test.yaml``) holds::

    policy: ../policies/research.json      # relative to the test file; or a directory of policies
    cases:
      - name: allowed labels request
        request: {policy_user: alice, policy_project_id: internal-compression, ...}
        usage: {tokens_today_project: 0}    # optional
        expect: {decision: allow}           # or {decision: deny, reasons: [PROJECT_NOT_ALLOWED]}

``expect.reasons`` must be a subset of the decision's reasons; ``expect.exact_reasons`` must equal them. Every key
of a file, a case and an expectation is checked: a typo (``decison:``) is an error, never a silently passing case.

Each case is judged by a ``Judge``: ``distillgate policy test`` passes the gateway's own path
(``distillgate.gateway.judge.preview``: parsing, prompt screens, defaults, then ``decide``), so a test passes
exactly when the gateway would decide the same. Without one, ``decide`` alone judges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillgate.errors import ConfigError, ConfigIssue, NotFoundError
from distillgate.policy.decision import Decision, Request, Usage, decide
from distillgate.policy.model import PolicySet, load_policies, parse_document

#: judge a request file's mapping under a policy set, given usage; ``where`` names it in errors
Judge = Callable[[PolicySet, Mapping[str, Any], Usage, str], Decision]
FILE_KEYS = frozenset({"policy", "cases"})
CASE_KEYS = frozenset({"name", "request", "usage", "expect"})
EXPECT_KEYS = frozenset({"decision", "reasons", "exact_reasons"})
USAGE_KEYS = {"tokens_today_project": int, "tokens_today_user": int, "records_run": int, "run_project": str}


@dataclass
class CaseResult:
    file: str
    name: str
    passed: bool
    decision: Decision | None
    failures: list[str] = field(default_factory=list)


def decide_only(policies: PolicySet, data: Mapping[str, Any], usage: Usage, where: str) -> Decision:
    request = Request.from_mapping(data)
    return decide(policies.select(request.project), request, usage)


def parse_usage(data: Any, where: str) -> Usage:
    """``usage`` of a case or ``policy explain --usage``: known keys with values of the right type."""
    if data is None:
        return Usage()
    allowed = ", ".join(USAGE_KEYS)
    if not isinstance(data, dict):
        raise ConfigError(where, [ConfigIssue("usage", f"must be a mapping of {allowed}", 'e.g. {"records_run": 3}')])
    issues = [ConfigIssue(f"usage.{k}", f"unknown key {k!r}", f"use one of {allowed}") for k in data
              if k not in USAGE_KEYS]
    for key, typ in USAGE_KEYS.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, typ) or isinstance(value, bool)
                                  or (isinstance(value, int) and value < 0)):
            issues.append(ConfigIssue(f"usage.{key}", f"must be {'a non-negative integer' if typ is int else 'a string'}"
                                      f", got {value!r}", "fix the value"))
    if issues:
        raise ConfigError(where, issues)
    return Usage(**{k: v for k, v in data.items() if v is not None})


def _unknown(data: Mapping[str, Any], known: frozenset[str], prefix: str) -> list[ConfigIssue]:
    return [ConfigIssue(f"{prefix}{k}", f"unknown key {k!r}", f"allowed: {', '.join(sorted(known))}")
            for k in data if k not in known]


def _check_case(case: Any, where: str) -> dict[str, Any]:
    if not isinstance(case, dict):
        raise ConfigError(where, [ConfigIssue("", "a case must be a mapping with request and expect")])
    issues = _unknown(case, CASE_KEYS, "")
    expect = case.get("expect")
    if expect is None or not isinstance(expect, dict):
        issues.append(ConfigIssue("expect", "every case needs an `expect:` mapping", "e.g. expect: {decision: allow}"))
    else:
        issues += _unknown(expect, EXPECT_KEYS, "expect.")
        if "decision" in expect and expect["decision"] not in ("allow", "deny"):
            issues.append(ConfigIssue("expect.decision", f"must be allow or deny, got {expect['decision']!r}"))
        for key in ("reasons", "exact_reasons"):
            value = expect.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(r, str) for r in value)):
                issues.append(ConfigIssue(f"expect.{key}", "must be a list of reason codes"))
        if not EXPECT_KEYS & set(expect):
            issues.append(ConfigIssue("expect", "expects nothing", "give decision, reasons or exact_reasons"))
    if not isinstance(case.get("request") or {}, dict):
        issues.append(ConfigIssue("request", "must be a mapping"))
    if issues:
        raise ConfigError(where, issues)
    return case


def run_file(path: Path, judge: Judge = decide_only) -> list[CaseResult]:
    doc = parse_document(path)
    if not isinstance(doc, dict) or "policy" not in doc or not isinstance(doc.get("cases"), list):
        raise ConfigError(str(path), [ConfigIssue("", "a policy test file needs `policy:` and a `cases:` list",
                                                  "see docs/policy.md#policy-tests")])
    if issues := _unknown(doc, FILE_KEYS, ""):
        raise ConfigError(str(path), issues)
    policies = load_policies((path.parent / str(doc["policy"])).resolve())
    results = []
    for i, raw in enumerate(doc["cases"]):
        where = f"{path}:cases[{i}]"
        case = _check_case(raw, where)
        name = str(case.get("name", f"case {i}"))
        decision = judge(policies, case.get("request") or {}, parse_usage(case.get("usage"), where), where)
        expect = case["expect"]
        failures = []
        want = expect.get("decision")
        got = "allow" if decision.allowed else "deny"
        if want is not None and want != got:
            failures.append(f"expected {want}, got {got} ({', '.join(decision.reasons)})")
        missing = [r for r in expect.get("reasons", []) if r not in decision.reasons]
        if missing:
            failures.append(f"missing reasons {missing}; got {list(decision.reasons)}")
        exact = expect.get("exact_reasons")
        if exact is not None and sorted(exact) != sorted(decision.reasons):
            failures.append(f"expected exactly {sorted(exact)}, got {sorted(decision.reasons)}")
        results.append(CaseResult(str(path), name, not failures, decision, failures))
    return results


def run_dir(path: str | Path, judge: Judge = decide_only) -> list[CaseResult]:
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml", ".json") and f.is_file()
                       and _is_test_file(f))
    else:
        raise NotFoundError(f"no such file or directory: {p}")
    if not files:
        raise NotFoundError(f"no policy test files in {p}", hint="test files hold `policy:` and `cases:`")
    results: list[CaseResult] = []
    for f in files:
        results.extend(run_file(f, judge))
    return results


def _is_test_file(path: Path) -> bool:
    try:
        doc = parse_document(path)
    except ConfigError:
        return path.stem.endswith("_test")
    return isinstance(doc, dict) and "cases" in doc and "policy" in doc
