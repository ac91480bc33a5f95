from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distillgate.errors import ConfigError, NotFoundError
from distillgate.policy import load_policies, load_policy, policy_from_data

from _foundation_support import SEED, write_policy


def test_seed_policy_loads_exactly_as_written(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path))
    assert policy.policy_id == "ml-research-distillation"
    assert policy.allowed_projects == ["internal-compression", "refusal-evals"]
    assert policy.blocked_outputs == ["third_party_model_extraction", "credentialed_api_replication"]
    assert policy.quotas.tokens_per_day == 250000 and policy.quotas.records_per_run == 5000
    assert policy.audit.reason_codes is True and policy.audit.export == "s3://ai-governance/distillation/"
    # defaults keep the seed's meaning: any model, no per-user limits, no extra destinations
    assert policy.approved_models is None and policy.quotas.user_tokens_per_day is None
    assert policy.destinations() == ["s3://ai-governance/distillation/"]


def test_yaml_and_json_give_the_same_policy_and_hash(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(SEED))
    a = load_policy(write_policy(tmp_path))
    b = load_policy(tmp_path / "p.yaml")
    assert a == b and a.content_hash == b.content_hash and len(a.content_hash) == 64


def test_content_hash_changes_with_any_rule() -> None:
    a = policy_from_data(SEED)
    b = policy_from_data({**SEED, "quotas": {"tokens_per_day": 250001, "records_per_run": 5000}})
    assert a.content_hash != b.content_hash


def test_unknown_keys_are_rejected_with_path_and_suggestion() -> None:
    bad = {**SEED, "alowed_projects": ["x"], "quotas": {"tokens_per_day": 1, "record_per_run": 3}}
    with pytest.raises(ConfigError) as info:
        policy_from_data(bad, "bad.json")
    rendered = {issue.path: issue for issue in info.value.issues}
    assert "alowed_projects" in rendered and "did you mean 'allowed_projects'" in rendered["alowed_projects"].fix
    assert "quotas.record_per_run" in rendered and "records_per_run" in rendered["quotas.record_per_run"].fix


def test_every_error_is_reported_at_once() -> None:
    bad = {"policy_id": "has spaces!", "allowed_outputs": "labels", "quotas": {"tokens_per_day": -5},
           "audit": {"export": 3}, "surprise": 1}
    with pytest.raises(ConfigError) as info:
        policy_from_data(bad)
    paths = {issue.path for issue in info.value.issues}
    assert {"policy_id", "allowed_projects", "allowed_outputs", "quotas.tokens_per_day", "audit.export",
            "surprise"} <= paths


def test_cross_field_rules() -> None:
    bad = {**SEED, "allowed_outputs": ["labels"], "blocked_outputs": ["labels"],
           "project_users": {"ghost": ["a"]}, "output_contracts": {"rubrics": {"max_chars": 10}}}
    with pytest.raises(ConfigError) as info:
        policy_from_data(bad)
    text = str(info.value)
    assert "both allowed and blocked: labels" in text
    assert "'ghost'" in text and "'rubrics'" in text


def test_output_contract_schema_must_be_valid() -> None:
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        policy_from_data({**SEED, "output_contracts": {"labels": {"json_schema": {"type": "no-such-type"}}}})
    ok = policy_from_data({**SEED, "output_contracts": {"labels": {
        "json_schema": {"type": "object", "required": ["label"]}, "labels": ["a", "b"], "enforcement": "block"}}})
    assert ok.output_contracts["labels"].enforcement == "block"


def test_directory_of_policies_and_project_ownership(tmp_path: Path) -> None:
    write_policy(tmp_path, name="a.json")
    write_policy(tmp_path, {**SEED, "policy_id": "other", "allowed_projects": ["safety"]}, name="b.yaml")
    policies = load_policies(tmp_path)
    assert policies.ids() == ["ml-research-distillation", "other"]
    assert policies.select("safety").policy_id == "other"
    assert policies.select("unknown").policy_id == "ml-research-distillation"
    write_policy(tmp_path, {**SEED, "policy_id": "dup-project", "allowed_projects": ["safety"]}, name="c.json")
    with pytest.raises(ConfigError, match="governed by two policies"):
        load_policies(tmp_path)


def test_syntax_errors_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"policy_id": ')
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_policy(tmp_path / "broken.json")
    with pytest.raises(NotFoundError):
        load_policies(tmp_path / "nope")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_policy(tmp_path / "list.json")
