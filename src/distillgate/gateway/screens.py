"""Prompt screens: detect blocked output classes in the prompt before anything is forwarded.

A screen is any object with ``name``, ``output_class`` and ``scan(text) -> ScreenHit | None`` (the ``Screen``
protocol). The gateway runs every configured screen over the request's text and hands the set of hit classes to
``decide()`` as ``Request.screen_hits``; the policy says which classes are blocked. Add your own screen with
``screens: ["package.module:ATTR", ...]`` in the gateway config (ATTR is a Screen instance or a zero-argument
factory).

Shipped screens (precision/recall on ``tests/data/gateway_screens.jsonl``: see docs/gateway.md):

- ``credentials`` → ``credentialed_api_replication``: third-party credentials in the prompt (AWS, OpenAI,
  Anthropic, GitHub, Slack, Google, Stripe, Hugging Face keys, private key blocks, bearer tokens, ``api_key=...``
  assignments with a long random-looking value).
- ``extraction`` → ``third_party_model_extraction``: requests to imitate, reproduce, clone or extract another
  provider's model, its outputs or its system prompt.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from distillgate.errors import ConfigError, ConfigIssue

CREDENTIAL_CLASS = "credentialed_api_replication"
EXTRACTION_CLASS = "third_party_model_extraction"


@dataclass(frozen=True)
class ScreenHit:
    screen: str
    output_class: str
    rule: str  # which rule fired (never the secret itself)


@runtime_checkable
class Screen(Protocol):
    name: str
    output_class: str

    def scan(self, text: str) -> ScreenHit | None: ...


def _entropy(s: str) -> float:
    counts: dict[str, int] = {}
    for ch in s:
        counts[ch] = counts.get(ch, 0) + 1
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values()) if s else 0.0


class CredentialScreen:
    """Third-party service credentials pasted into a prompt."""

    name = "credentials"
    output_class = CREDENTIAL_CLASS

    RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
        ("aws_access_key_id", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
        ("aws_secret_key", re.compile(r"aws_?secret_?(?:access_?)?key\W{0,5}[A-Za-z0-9/+=]{40}", re.I)),
        ("anthropic_key", re.compile(r"\bsk-ant-[A-Za-z0-9_-]{20,}")),
        ("openai_key", re.compile(r"\bsk-(?:proj-|svcacct-|None-)?[A-Za-z0-9_-]{20,}")),
        ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})")),
        ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
        ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),
        ("stripe_key", re.compile(r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{20,}")),
        ("huggingface_token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
        ("private_key_block", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
        ("bearer_token", re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{24,}")),
    )
    ASSIGNMENT = re.compile(
        r"(?:api[_-]?key|secret[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|password)"
        r"""["']?\s*[:=]\s*["']?([A-Za-z0-9_\-/+.]{20,})""", re.I)

    # Every rule needs one of these substrings (lower-cased superset): a cheap check skips the rules for most
    # prompts.
    TRIGGERS = ("akia", "asia", "agpa", "aida", "aroa", "aws", "sk-", "sk_", "rk_", "ghp_", "gho_", "ghu_",
                "ghs_", "ghr_", "github_pat", "xox", "aiza", "hf_", "begin", "bearer", "key", "secret", "token",
                "password")

    def scan(self, text: str) -> ScreenHit | None:
        lowered = text.lower()
        if not any(t in lowered for t in self.TRIGGERS):
            return None
        for rule, pattern in self.RULES:
            if pattern.search(text):
                return ScreenHit(self.name, self.output_class, rule)
        for m in self.ASSIGNMENT.finditer(text):
            value = m.group(1)
            if _entropy(value) >= 3.5 and any(c.isdigit() for c in value):
                return ScreenHit(self.name, self.output_class, "credential_assignment")
        return None


_PROVIDER = (r"(?:gpt-?[345][a-z0-9.\-]*|gpt-?4o|chat-?gpt|openai(?:'s)?|o[13](?:-mini)?|claude(?:[ -][\w.]+)?|"
             r"anthropic(?:'s)?|gemini(?:[ -][\w.]+)?|bard|google(?:'s)? (?:model|llm|ai)|copilot|grok|"
             r"mistral(?:'s)?|deepseek|command[ -]r|palm ?2?)")
_TARGET = r"(?:model|llm|assistant|chatbot|ai|weights|parameters|outputs?|responses?|answers?|behaviou?r|style|voice|personality|capabilit(?:y|ies))"


class ExtractionScreen:
    """Prompts that ask to imitate, reproduce or extract another provider's model or its system prompt."""

    name = "extraction"
    output_class = EXTRACTION_CLASS

    RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
        ("system_prompt_extraction", re.compile(
            r"\b(?:reveal|print|show|repeat|output|leak|dump|recite|disclose|display|give me|tell me|share|"
            r"copy|paste|write out|spell out|what (?:is|are|was|were))\b[^.?!\n]{0,40}?"
            r"\b(?:your|the|its|their|this|chatgpt's|claude's|gemini's)\s+(?:[\w-]+\s+){0,2}?"
            r"(?:(?:system|hidden|developer|secret|internal)[ -](?:prompt|instructions?|message|rules)|"
            r"(?:initial|original)[ -](?:prompt|instructions?)|pre-?prompt)", re.I)),
        ("instruction_override_extraction", re.compile(
            r"\bignore (?:all |any )?(?:the )?(?:previous|prior|above|earlier) (?:instructions|prompts?|rules)"
            r"[^.\n]{0,80}\b(?:print|reveal|repeat|output|show|tell)", re.I)),
        ("imitate_provider", re.compile(
            r"\b(?:imitate|mimic|mirror|impersonate|replicate|reproduce|clone|copy|emulate|pretend (?:to be|you are)|"
            r"act (?:exactly )?as|respond (?:exactly )?as|behave (?:exactly )?like|answer (?:exactly )?like|"
            r"talk (?:exactly )?like|sound (?:exactly )?like|be an? (?:exact )?(?:copy|clone|replica) of)"
            r"\b[^.?!\n]{0,40}?\b" + _PROVIDER + r"\b", re.I)),
        ("extract_provider_model", re.compile(
            r"\b(?:extract|distill|distil|steal|exfiltrate|reverse[- ]engineer|harvest|scrape|dump)\b"
            r"[^.?!\n]{0,40}?\b" + _PROVIDER + r"\b", re.I)),
        ("provider_model_extraction", re.compile(
            r"\b" + _PROVIDER + r"(?:'s)?\b[^.?!\n]{0,30}?\b" + _TARGET + r"\b[^.?!\n]{0,30}?"
            r"\b(?:extract(?:ion|ed)?|distill(?:ation|ed)?|clon(?:e|ing|ed)|replicat(?:e|ion|ing)|"
            r"reverse[- ]engineer(?:ing|ed)?|steal(?:ing)?)\b", re.I)),
        ("train_on_provider_outputs", re.compile(
            r"\b(?:train|fine-?tune|build)\b[^.?!\n]{0,40}\b(?:clone|copy|replica|imitation|drop-in replacement)"
            r"\b[^.?!\n]{0,20}\bof\b[^.?!\n]{0,10}\b" + _PROVIDER + r"\b", re.I)),
    )

    # Every rule needs one of these substrings (lower-cased superset of _PROVIDER and the prompt words).
    TRIGGERS = ("prompt", "instruction", "message", "rules", "gpt", "openai", "o1", "o3", "claude", "anthropic",
                "gemini", "bard", "google", "copilot", "grok", "mistral", "deepseek", "command", "palm")

    def scan(self, text: str) -> ScreenHit | None:
        lowered = text.lower()
        if not any(t in lowered for t in self.TRIGGERS):
            return None
        for rule, pattern in self.RULES:
            if pattern.search(text):
                return ScreenHit(self.name, self.output_class, rule)
        return None


BUILTIN: dict[str, type[CredentialScreen] | type[ExtractionScreen]] = {
    "credentials": CredentialScreen,
    "extraction": ExtractionScreen,
}
DEFAULT_SCREENS: tuple[str, ...] = ("credentials", "extraction")


def load_screens(specs: Sequence[str] = DEFAULT_SCREENS) -> tuple[Screen, ...]:
    """Build screens from names (``credentials``, ``extraction``) or ``module:attr`` import specs."""
    out: list[Screen] = []
    issues: list[ConfigIssue] = []
    for i, spec in enumerate(specs):
        if spec in BUILTIN:
            out.append(BUILTIN[spec]())
            continue
        if ":" not in spec:
            issues.append(ConfigIssue(f"screens[{i}]", f"unknown screen {spec!r}",
                                      f"use one of {sorted(BUILTIN)} or 'package.module:attr'"))
            continue
        module_name, attr = spec.split(":", 1)
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            issues.append(ConfigIssue(f"screens[{i}]", f"cannot import {spec!r}: {exc}",
                                      "check the module is importable and the attribute exists"))
            continue
        try:
            screen = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Screen)) else obj
        except TypeError as exc:
            issues.append(ConfigIssue(f"screens[{i}]", f"cannot build {spec!r} without arguments: {exc}",
                                      "point at a Screen instance or a zero-argument factory"))
            continue
        if not isinstance(screen, Screen):
            issues.append(ConfigIssue(f"screens[{i}]", f"{spec!r} is not a Screen",
                                      "give it name, output_class and scan(text) -> ScreenHit | None"))
            continue
        out.append(screen)
    if issues:
        raise ConfigError("gateway screens", issues)
    return tuple(out)


def run_screens(screens: Iterable[Screen], text: str) -> tuple[ScreenHit, ...]:
    """Every hit (one per screen at most)."""
    hits = []
    for screen in screens:
        hit = screen.scan(text)
        if hit is not None:
            hits.append(hit)
    return tuple(hits)
