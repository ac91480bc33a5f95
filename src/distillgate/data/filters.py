"""Row filters, each emitting a reason code. Configured per task (``filters`` / ``tasks.<name>.filters``).

Per-row filters look at the normalised answer; the dataset-wide ones (duplicates, disagreement, contamination) are
run by ``distillgate.data.pipeline``. A row passes when it collects no reason code. Every code is listed in
``REASONS`` and documented in docs/dataset.md (a test keeps the two in step).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import orjson

from distillgate.data.config import FiltersConfig, NormaliseConfig
from distillgate.data.normalize import canonical_label
from distillgate.data.schema import Row
from distillgate.errors import ConfigError, ConfigIssue, NotFoundError

REASONS: dict[str, str] = {
    "INVALID_JSON": "the answer is not a JSON object (valid_json)",
    "SCHEMA_MISMATCH": "the JSON answer does not match filters.json_schema",
    "TOO_SHORT": "the normalised answer is shorter than filters.length.min_chars",
    "TOO_LONG": "the normalised answer is longer than filters.length.max_chars",
    "FORBIDDEN_PHRASE": "the answer contains one of filters.forbidden_phrases (case-insensitive)",
    "MISSING_CITATION": "the answer has no citation matching filters.citation.pattern",
    "LABEL_NOT_ALLOWED": "the label is missing or not in filters.allowed_labels / allowed_labels_file",
    "EXACT_DUPLICATE": "the input repeats an earlier input (case, spacing and punctuation ignored)",
    "NEAR_DUPLICATE": "the input is a near-duplicate (Jaccard >= dedup.threshold) of an earlier input",
    "SAMPLE_DISAGREEMENT": "the k teacher samples for the input agree less than filters.disagreement.min_agreement",
    "CONTAMINATED": "the input matches an evaluation-set or golden input (exactly or near), or shares a golden group",
    "REVIEW_REJECTED": "a reviewer rejected the row",
    "LOW_GRADE": "the answer's rubric grade is below filters.min_grade",
    "UNGRADED": "filters.min_grade is set but the answer has no rubric grade (not graded, or the reply was unparsed)",
}

# Reasons about the answer: a reviewer who accepts or corrects a row overrides them.
ANSWER_REASONS = frozenset(
    {"INVALID_JSON", "SCHEMA_MISMATCH", "TOO_SHORT", "TOO_LONG", "FORBIDDEN_PHRASE", "MISSING_CITATION",
     "LABEL_NOT_ALLOWED", "SAMPLE_DISAGREEMENT", "LOW_GRADE", "UNGRADED"}
)


@dataclass
class RowFilter:
    """The per-row filters of one task, compiled once."""

    cfg: FiltersConfig
    schema_validator: Any
    forbidden: re.Pattern[str] | None
    citation: re.Pattern[str] | None
    allowed: frozenset[str] | None

    def check(self, row: Row, parsed: bool) -> list[str]:
        reasons: list[str] = []
        cfg = self.cfg
        output = row.output or ""
        if cfg.valid_json and not parsed:
            reasons.append("INVALID_JSON")
        if self.schema_validator is not None:
            try:
                value = orjson.loads(output) if parsed else None
            except orjson.JSONDecodeError:
                value = None
            if value is None or not self.schema_validator.is_valid(value):
                reasons.append("SCHEMA_MISMATCH")
        if cfg.length is not None:
            if len(output) < cfg.length.min_chars:
                reasons.append("TOO_SHORT")
            elif len(output) > cfg.length.max_chars:
                reasons.append("TOO_LONG")
        if self.forbidden is not None and self.forbidden.search(row.output_raw or ""):
            reasons.append("FORBIDDEN_PHRASE")
        if self.citation is not None and not self.citation.search(output):
            reasons.append("MISSING_CITATION")
        if self.allowed is not None and row.label not in self.allowed:
            reasons.append("LABEL_NOT_ALLOWED")
        if cfg.min_grade is not None:
            if row.grade is None:
                reasons.append("UNGRADED")
            elif row.grade < cfg.min_grade:
                reasons.append("LOW_GRADE")
        return reasons


def _allowed_labels(cfg: FiltersConfig, base: Path | None) -> frozenset[str] | None:
    if cfg.allowed_labels is None and cfg.allowed_labels_file is None:
        return None
    labels = set(cfg.allowed_labels or [])
    if cfg.allowed_labels_file:
        path = Path(cfg.allowed_labels_file)
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
        if not path.exists():
            raise NotFoundError(
                f"allowed_labels_file {cfg.allowed_labels_file} does not exist",
                hint="give a JSON list of labels, e.g. data/banking77/categories.json",
            )
        loaded = orjson.loads(path.read_bytes())
        if not isinstance(loaded, list) or not all(isinstance(x, str) for x in loaded):
            raise ConfigError(str(path), [ConfigIssue("", "expected a JSON list of label strings")])
        labels.update(loaded)
    return frozenset(labels)


def compile_filters(
    cfg: FiltersConfig, *, base: Path | None = None, normalise: NormaliseConfig | None = None
) -> RowFilter:
    """Compile one task's filters. Allowed labels are put through the same label canonicalisation as answers."""
    validator = None
    if cfg.json_schema is not None:
        try:
            cls = jsonschema.validators.validator_for(cfg.json_schema)
            cls.check_schema(cfg.json_schema)
        except jsonschema.SchemaError as exc:
            raise ConfigError("filters.json_schema", [ConfigIssue("filters.json_schema", exc.message)]) from None
        validator = cls(cfg.json_schema)
    forbidden = (
        re.compile("|".join(re.escape(p) for p in cfg.forbidden_phrases), re.IGNORECASE)
        if cfg.forbidden_phrases else None
    )
    try:
        citation = re.compile(cfg.citation.pattern) if cfg.citation is not None else None
    except re.error as exc:
        raise ConfigError("filters.citation", [ConfigIssue("filters.citation.pattern", str(exc))]) from None
    allowed = _allowed_labels(cfg, base)
    if allowed is not None and normalise is not None:
        allowed = frozenset(canonical_label(label, normalise) for label in allowed)
    return RowFilter(cfg, validator, forbidden, citation, allowed)


def agreement_scores(labels_by_input: dict[str, list[str | None]]) -> dict[str, float]:
    """Agreement of each input's k samples: share of samples naming the majority label (1.0 for one sample)."""
    scores: dict[str, float] = {}
    for input_id, labels in labels_by_input.items():
        if len(labels) <= 1:
            scores[input_id] = 1.0
            continue
        counts: dict[str | None, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        scores[input_id] = max(counts.values()) / len(labels)
    return scores


def describe(codes: Iterable[str]) -> list[str]:
    return [f"{code}: {REASONS.get(code, 'unknown reason')}" for code in codes]
