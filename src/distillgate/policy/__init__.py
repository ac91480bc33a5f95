"""Policies and the one function that judges a request: ``decide(policy, request, usage)``."""

from distillgate.policy.decision import Decision, Request, Usage, decide, estimate_tokens, prompt_text
from distillgate.policy.model import (
    OutputContract,
    Policy,
    PolicySet,
    load_policies,
    load_policy,
    policy_from_data,
)
from distillgate.policy.reasons import REASONS, ReasonInfo

__all__ = [
    "REASONS",
    "Decision",
    "OutputContract",
    "Policy",
    "PolicySet",
    "ReasonInfo",
    "Request",
    "Usage",
    "decide",
    "estimate_tokens",
    "load_policies",
    "load_policy",
    "policy_from_data",
    "prompt_text",
]
