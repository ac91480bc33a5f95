"""Shared helpers for the foundation tests (policy, ledger, audit)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
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


def raised_in_threads(fn: Callable[[], object], n: int) -> list[BaseException]:
    """Run ``fn`` in ``n`` threads released together (a barrier); what they raised, for the test to assert on."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            start.wait()
            fn()
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
