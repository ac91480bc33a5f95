"""Shared helpers for the foundation tests (policy, ledger, audit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillgate.policy import Request

SEED: dict[str, Any] = {
    "policy_id": "ml-research-distillation",
    "allowed_projects": ["internal-compression", "refusal-evals"],
    "allowed_outputs": ["labels", "rubrics", "summaries", "synthetic_records"],
    "blocked_outputs": ["third_party_model_extraction", "credentialed_api_replication"],
    "quotas": {"tokens_per_day": 250000, "records_per_run": 5000},
    "audit": {"reason_codes": True, "export": "s3://ai-governance/distillation/"},
}


def write_policy(directory: Path, data: dict[str, Any] | None = None, name: str = "policy.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(data if data is not None else SEED))
    return path


def request(**overrides: Any) -> Request:
    base: dict[str, Any] = {
        "user": "alice", "project": "internal-compression", "run": "run-1", "output_type": "labels",
        "model": "local/smollm2-135m-instruct", "max_tokens": 10, "prompt_tokens": 5,
    }
    base.update(overrides)
    return Request(**base)
