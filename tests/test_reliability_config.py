"""Malformed policies and gateway configs: any mix of injected faults is reported in full, never as a crash.

Hand-picked cases live in tests/test_policy_model.py and tests/test_gateway_cli.py; these are property tests that
inject several independent faults at once and require one ConfigError naming every one of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _gateway_support import MAIN_POLICY
from distillgate.errors import ConfigError
from distillgate.gateway.config import config_from_data
from distillgate.policy import policy_from_data

# (path, bad value): each one alone makes the policy invalid, and the error must name that path
POLICY_FAULTS: list[tuple[str, Any]] = [
    ("quotas.tokens_per_day", -1),
    ("quotas.records_per_run", "many"),
    ("quotas.default_max_tokens", [1]),
    ("allowed_outputs", "labels"),
    ("audit.log_content", {"x": 1}),
    ("hardening.max_top_logprobs", -3),
    ("project_users", ["alice"]),
    ("approved_models", 7),
    ("allowed_destinations", "file:///tmp/"),
    ("surprise_key", 1),
    ("quotas.tokens_pr_day", 5),
]

GATEWAY_FAULTS: list[tuple[str, Any]] = [
    ("port", 70000),
    ("max_body_bytes", 10),
    ("reclaim_interval_s", 0),
    ("reservation_ttl_s", -1),
    ("settle", "whenever"),
    ("screens", "credentials"),
    ("upstreams.fake.timeout_s", 0),
    ("upstreams.fake.max_retries", 99),
    ("upstreams.fake.bogus", True),
    ("prot", 1),
]


def inject(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def reported_paths(exc: ConfigError) -> set[str]:
    return {issue.path for issue in exc.issues}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(POLICY_FAULTS), min_size=1, max_size=6, unique_by=lambda f: f[0]))
def test_every_injected_policy_fault_is_reported(faults: list[tuple[str, Any]]) -> None:
    doc = copy.deepcopy(MAIN_POLICY)
    for path, value in faults:
        inject(doc, path, value)
    with pytest.raises(ConfigError) as info:
        policy_from_data(doc, "fuzzed.json")
    paths = reported_paths(info.value)
    for path, _ in faults:
        assert any(p == path or p.startswith(path + ".") for p in paths), (path, info.value.issues)
    for issue in info.value.issues:
        assert issue.message  # every issue says what is wrong


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(GATEWAY_FAULTS), min_size=1, max_size=6, unique_by=lambda f: f[0]))
def test_every_injected_gateway_config_fault_is_reported(tmp_path: Path, faults: list[tuple[str, Any]]) -> None:
    (tmp_path / "p.json").write_text("{}")
    doc: dict[str, Any] = {"policy": str(tmp_path / "p.json"),
                           "upstreams": {"fake": {"base_url": "http://127.0.0.1:9/v1"}}}
    for path, value in faults:
        inject(doc, path, value)
    with pytest.raises(ConfigError) as info:
        config_from_data(doc, "fuzzed.yaml")
    paths = reported_paths(info.value)
    for path, _ in faults:
        assert path in paths, (path, info.value.issues)


def test_short_reservation_ttl_is_refused_with_the_bound() -> None:
    doc = {"policy": ".", "reservation_ttl_s": 10,
           "upstreams": {"fake": {"base_url": "http://127.0.0.1:9/v1", "timeout_s": 5, "max_retries": 2}}}
    with pytest.raises(ConfigError) as info:
        config_from_data(doc)
    (issue,) = info.value.issues
    assert issue.path == "reservation_ttl_s" and "still in flight" in issue.message and "above" in issue.fix


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
                    max_leaves=20))
def test_arbitrary_documents_give_config_errors_not_crashes(doc: Any) -> None:
    for parse in (policy_from_data, config_from_data):
        try:
            parse(doc)
        except ConfigError as exc:
            assert exc.issues
