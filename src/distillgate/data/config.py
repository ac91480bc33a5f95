"""The dataset configuration: ingest column mapping, normalisation, filters (per task), dedup, splits, review.

Every section forbids unknown keys; ``load_config`` reports every problem at once as a ``ConfigError``. The resolved
configuration is recorded in each frozen version's manifest, so a version says which filters and normalisation
were in force. See docs/dataset.md for every key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillgate.errors import ConfigError, ConfigIssue, NotFoundError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnMapping(_Strict):
    """Which traffic columns hold what. Only ``input`` is required."""

    input: str = "text"
    record_id: str | None = None  # default: the row number in the file
    group: str | None = None  # account / document / conversation: rows of one group never cross splits
    timestamp: str | None = None  # ISO 8601; used by time-ordered splits
    reference_label: str | None = None  # a label shipped with the traffic (kept for analysis)
    task: str | None = None
    tags: str | None = None  # comma-separated tags, e.g. "adversarial"
    output: str | None = None  # teacher answers already on file (imports a finished generation)
    teacher_model: str | None = None


class IngestConfig(_Strict):
    columns: ColumnMapping = ColumnMapping()
    format: Literal["csv", "jsonl", "parquet"] | None = None  # default: from the file suffix
    task: str = "default"


class NormaliseConfig(_Strict):
    parse_json: bool = True  # parse JSON answers (also inside ```json fences) and re-serialise canonically
    key_aliases: dict[str, str] = Field(default_factory=lambda: {"type": "category", "intent": "category"})
    label_key: str = "category"
    plain_label: bool = True  # a non-JSON answer of at most 4 words (e.g. "card_arrival") is read as the label
    label_aliases: dict[str, str] = Field(default_factory=dict)
    canonical_labels: bool = True  # lower-case, spaces and hyphens to underscores
    refusal_patterns: list[str] = Field(
        default_factory=lambda: ["i can't help", "i cannot help", "i can't assist", "i cannot assist", "i'm sorry, but"]
    )
    refusal_text: str = "I can't help with that."
    refusal_label: str = "refusal"
    explanation_key: str = "explanation"
    max_explanation_chars: int | None = 300


class LengthBounds(_Strict):
    min_chars: int = 1
    max_chars: int = 4000


class CitationRule(_Strict):
    pattern: str = r"\[\d+\]|https?://\S+"


class DisagreementRule(_Strict):
    min_agreement: float = Field(default=0.6, ge=0.0, le=1.0)


class FiltersConfig(_Strict):
    """Filters and whether each runs. ``None`` / ``false`` switches a filter off."""

    valid_json: bool = False
    json_schema: dict[str, Any] | None = None
    length: LengthBounds | None = LengthBounds()
    forbidden_phrases: list[str] = Field(default_factory=lambda: ["as an ai language model"])
    citation: CitationRule | None = None
    allowed_labels: list[str] | None = None
    allowed_labels_file: str | None = None  # a JSON list, e.g. data/banking77/categories.json
    exact_duplicates: bool = True
    near_duplicates: bool = True
    disagreement: DisagreementRule | None = DisagreementRule()
    decontaminate: bool = True
    min_grade: float | None = None  # rows whose rubric grade is below this fail LOW_GRADE (ungraded: UNGRADED)


class DedupConfig(_Strict):
    """MinHash LSH near-duplicate parameters (see docs/dataset.md for the S-curve)."""

    ngram: int = Field(default=2, ge=1, le=5)  # word n-gram shingles (texts shorter than n use their words)
    num_perm: int = Field(default=64, ge=8, le=1024)
    bands: int = Field(default=16, ge=1)
    threshold: float = Field(default=0.8, gt=0.0, le=1.0)  # Jaccard on shingle sets, verified exactly
    seed: int = 42

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class EvalSet(_Strict):
    """An evaluation set to decontaminate against."""

    path: str
    column: str = "text"
    format: Literal["csv", "jsonl", "parquet"] | None = None
    name: str | None = None


class GoldenConfig(_Strict):
    fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    ids_file: str | None = None  # one input_id per line; overrides fraction


class HoldoutConfig(_Strict):
    """Hard cases set aside (whole groups/clusters): rare labels, extreme lengths, ambiguous, adversarial, refusals."""

    enabled: bool = True
    rare_label_max_count: int = 2
    long_input_quantile: float | None = 0.995
    short_input_quantile: float | None = 0.005
    ambiguous_max_agreement: float = 0.75  # rows whose k samples agree less than this
    low_confidence_max_prob: float | None = 0.4  # rows whose teacher top label_prob is below this
    adversarial_tags: list[str] = Field(default_factory=lambda: ["adversarial"])
    cannot_answer_labels: list[str] = Field(default_factory=lambda: ["refusal", "cannot_answer"])


class SplitConfig(_Strict):
    ratios: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    by_time: bool = False
    golden: GoldenConfig = GoldenConfig()
    holdout: HoldoutConfig = HoldoutConfig()

    @model_validator(mode="after")
    def _ratios(self) -> SplitConfig:
        unknown = set(self.ratios) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"ratios name unknown split(s) {sorted(unknown)}; use train, val and test")
        if "train" not in self.ratios or abs(sum(self.ratios.values()) - 1.0) > 1e-6:
            raise ValueError(f"ratios must include train and sum to 1 (got {self.ratios})")
        return self


class ReviewConfig(_Strict):
    low_confidence_max_prob: float = 0.5
    long_output_chars: int = 600
    rare_label_max_count: int = 5
    low_grade_below: float = 3.0  # the low_grade queue: rubric grades below this


class RubricCriterion(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = Field(min_length=1)


class RubricScale(_Strict):
    min: int = 1
    max: int = 5

    @model_validator(mode="after")
    def _range(self) -> RubricScale:
        if not 1 <= self.max - self.min <= 10:
            raise ValueError(f"scale {self.min}..{self.max}: max must exceed min by 1 to 10 points")
        return self


class RubricConfig(_Strict):
    """How the teacher grades an answer (``distillgate.data.grade``): criteria, scale, and the governed call."""

    id: str = Field(default="rubric", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    criteria: list[RubricCriterion] = Field(min_length=1)
    scale: RubricScale = RubricScale()
    model: str | None = None  # the grader; None: the model that generated the answers
    output_type: str = "rubrics"  # policy_output_type of the grading calls
    scoring: Literal["text", "label_choices"] = "text"  # label_choices: a local teacher scores the scale's points
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    concurrency: int = Field(default=4, ge=1, le=64)


class ExportConfig(_Strict):
    allowed_destinations: list[str] = Field(default_factory=list)  # empty: any file:// ; s3:// must be listed


class TaskOverride(_Strict):
    filters: FiltersConfig


class DatasetConfig(_Strict):
    name: str = "dataset"
    ingest: IngestConfig = IngestConfig()
    normalise: NormaliseConfig = NormaliseConfig()
    filters: FiltersConfig = FiltersConfig()
    tasks: dict[str, TaskOverride] = Field(default_factory=dict)  # per-task filter settings
    dedup: DedupConfig = DedupConfig()
    decontamination: list[EvalSet] = Field(default_factory=list)
    split: SplitConfig = SplitConfig()
    review: ReviewConfig = ReviewConfig()
    rubric: RubricConfig | None = None  # grade every answer against it (`distillgate dataset grade`)
    export: ExportConfig = ExportConfig()

    def filters_for(self, task: str) -> FiltersConfig:
        override = self.tasks.get(task)
        return override.filters if override else self.filters


def parse_config(data: Any, source: str = "<config>") -> DatasetConfig:
    """Validate a config mapping; raise ``ConfigError`` listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("", f"expected a mapping, got {type(data).__name__}")])
    try:
        return DatasetConfig.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"])
            fix = "remove it (see docs/dataset.md for the keys)" if err["type"] == "extra_forbidden" else ""
            issues.append(ConfigIssue(path, err["msg"], fix))
        raise ConfigError(source, issues) from None


def load_config(path: str | Path | None) -> DatasetConfig:
    if path is None:
        return DatasetConfig()
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"dataset config {p} does not exist", hint="pass an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), [ConfigIssue("", f"not valid YAML: {exc}")]) from None
    return parse_config(data, str(p))


