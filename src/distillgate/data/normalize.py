"""Normalise the shape of teacher answers: stable keys, canonical labels, one refusal text, trimmed explanations.

``normalise_output(raw, cfg)`` returns the canonical answer text (sorted-key JSON when the answer is a JSON object),
the label it names, and whether it parsed. The configuration in force is recorded in every frozen version.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from distillgate.data.config import NormaliseConfig

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_SEPARATORS = re.compile(r"[\s\-]+")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Normalised:
    output: str
    label: str | None
    parsed: bool  # the answer was a JSON object (or a recognised refusal)
    refusal: bool = False


def canonical_label(label: str, cfg: NormaliseConfig) -> str:
    text = label.strip()
    if cfg.canonical_labels:
        text = _SEPARATORS.sub("_", text.lower()).strip("_")
    aliases = cfg.label_aliases
    if text in aliases:
        return aliases[text]
    if cfg.canonical_labels:
        for alias, target in aliases.items():
            if _SEPARATORS.sub("_", alias.strip().lower()).strip("_") == text:
                return target
    return text


def _json_object(text: str) -> dict[str, object] | None:
    candidates = [text]
    fenced = _FENCE.search(text)
    if fenced:
        candidates.insert(0, fenced.group(1).strip())
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut + "…"


def normalise_object(obj: Mapping[str, object], cfg: NormaliseConfig) -> tuple[dict[str, object], str | None]:
    """A JSON answer object with stable keys, its canonical label (under ``cfg.label_key``) and trimmed
    explanation; returns the fixed object and the label it names (None when it names none).

    Teacher answers go through it, and so does a reviewer's corrected answer, so both have the same shape.
    """
    fixed: dict[str, object] = {}
    for key, value in obj.items():
        name = cfg.key_aliases.get(key.strip().lower(), key.strip())
        if name not in fixed:  # the first spelling wins when both `type` and `category` appear
            fixed[name] = value
    label: str | None = None
    value = fixed.get(cfg.label_key)
    if isinstance(value, str) and value.strip():
        label = canonical_label(value, cfg)
        fixed[cfg.label_key] = label
    explanation = fixed.get(cfg.explanation_key)
    if isinstance(explanation, str):
        explanation = _SPACES.sub(" ", explanation).strip()
        if cfg.max_explanation_chars is not None:
            explanation = _trim(explanation, cfg.max_explanation_chars)
        fixed[cfg.explanation_key] = explanation
    return fixed, label


def normalise_output(
    raw: str, cfg: NormaliseConfig, label_probs: Mapping[str, float] | None = None
) -> Normalised:
    text = raw.strip()
    obj = _json_object(text) if cfg.parse_json else None
    if obj is not None:
        fixed, label = normalise_object(obj, cfg)
        if label is None and label_probs:
            label = canonical_label(max(label_probs, key=lambda k: label_probs[k]), cfg)
        return Normalised(orjson.dumps(fixed, option=orjson.OPT_SORT_KEYS).decode(), label, parsed=True)
    lowered = text.lower()
    if any(pattern in lowered for pattern in cfg.refusal_patterns):
        return Normalised(cfg.refusal_text, cfg.refusal_label, parsed=True, refusal=True)
    flat = _SPACES.sub(" ", text)
    if label_probs:
        label = canonical_label(max(label_probs, key=lambda k: label_probs[k]), cfg)
    elif cfg.plain_label and flat and len(flat) <= 64 and len(flat.split(" ")) <= 4:
        label = canonical_label(flat.strip(" .\"'"), cfg)  # a bare answer like "card_arrival" is the label
    else:
        label = None
    return Normalised(flat, label, parsed=False)
