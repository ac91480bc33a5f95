"""``distillgate policy test DIR``: table-driven policy tests, like ``opa test``.

A test file (``*.yaml``/``*.json`` in DIR, or any file named ``*_test.yaml``) holds::

    policy: ../policies/research.json      # relative to the test file; or a directory of policies
    cases:
      - name: allowed labels request
        request: {policy_user: alice, policy_project_id: internal-compression, ...}
        usage: {tokens_today_project: 0}    # optional
        expect: {decision: allow}           # or {decision: deny, reasons: [PROJECT_NOT_ALLOWED]}

``expect.reasons`` must be a subset of the decision's reasons; ``expect.exact_reasons`` must equal them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillgate.errors import ConfigError, ConfigIssue, NotFoundError
from distillgate.policy.decision import Decision, Request, Usage, decide
from distillgate.policy.model import load_policies, parse_document


@dataclass
class CaseResult:
    file: str
    name: str
    passed: bool
    decision: Decision | None
    failures: list[str] = field(default_factory=list)


def _usage(data: Any, where: str) -> Usage:
    if data is None:
        return Usage()
    if not isinstance(data, dict) or set(data) - {"tokens_today_project", "tokens_today_user", "records_run"}:
        raise ConfigError(where, [ConfigIssue("usage", "must map tokens_today_project/tokens_today_user/"
                                                       "records_run to integers")])
    return Usage(**{k: int(v) for k, v in data.items()})


def run_file(path: Path) -> list[CaseResult]:
    doc = parse_document(path)
    if not isinstance(doc, dict) or "policy" not in doc or not isinstance(doc.get("cases"), list):
        raise ConfigError(str(path), [ConfigIssue("", "a policy test file needs `policy:` and a `cases:` list",
                                                  "see docs/policy.md#policy-tests")])
    policies = load_policies((path.parent / str(doc["policy"])).resolve())
    results = []
    for i, case in enumerate(doc["cases"]):
        name = str(case.get("name", f"case {i}"))
        where = f"{path}:cases[{i}]"
        request = Request.from_mapping(case.get("request") or {})
        decision = decide(policies.select(request.project), request, _usage(case.get("usage"), where))
        expect = case.get("expect") or {}
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


def run_dir(path: str | Path) -> list[CaseResult]:
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
        results.extend(run_file(f))
    return results


def _is_test_file(path: Path) -> bool:
    try:
        doc = parse_document(path)
    except ConfigError:
        return path.stem.endswith("_test")
    return isinstance(doc, dict) and "cases" in doc and "policy" in doc
