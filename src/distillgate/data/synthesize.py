"""Synthetic inputs, governed like everything else: written by the teacher through the gateway, labelled separately.

    seed rows (real, train) ─plan─▶ tasks ─┬─ deterministic transform (no call)      ─┐
                                           └─ generator prompt ──gateway (synthetic_records)──▶ teacher ─┤ stamp
                                                                                                          ▼
           inputs of the working copy (source_file "synthetic", ``Row.synthetic`` = how it was made)
                                                                                                          ▼
           the labelling job (``distillgate.data.generate``, the project's template, output type ``labels``)
                                                                                                          ▼
           the build: the same filters, exact/near dedup (against real rows too), review queues, splits (train only)

Kinds (``KINDS``), each from seed rows:

- ``hard_negative``: the teacher's confusion pairs. For a seed whose label distribution puts label A first and B
  second (the smallest margins first), the teacher writes a message that looks like A but is B.
- ``edge_case``: deterministic transformations of seed rows (``TRANSFORMS``: empty, very short, very long,
  misspelt, mixed language, odd formatting), recorded as such (``synthetic.transform``, no generator call, no
  generator stamp: cheap and honest about what they are), and optionally ``written`` ones the teacher rewrites in one
  of ``WRITTEN_STYLES``.
- ``out_of_scope``: messages none of the task's labels covers (``intended_label`` is ``out_of_scope_label``).
- ``adversarial``: the seed's intent in indirect, distracting or negated wording.
- ``balance``: new messages for labels the seeds under-represent, up to a target distribution.

Choices, and why:

- **Seeds are real rows the build would put in train** (the build is run in memory over the real rows): a seed from
  test, val, golden or holdout would carry held-out content into training through a paraphrase no dedup sees.
- **Exactly once.** Every task has a deterministic id (``syn-<kind>-<hash of kind, template, seed rows, variant>``),
  which becomes the input id; a rerun asks only for tasks whose input is missing. The labelling job then labels
  exactly the inputs that have no row (``WorkingCopy.pending_generation``).
- **Two governed calls per written row**: the generator call (output type ``synthetic_records``, its stamp kept in
  ``synthetic.stamp``) and the labelling call (the project's output type, its stamp in ``Row.stamp``). The label
  the generator was asked for is kept as ``synthetic.intended_label``; the label trained on is the teacher's.
- **The share cap is checked before any call** (``synthetic.max_train_share`` of the dataset config, against the
  real train rows), so a plan that the build would refuse spends no quota; the build and the freeze check it again.
- A denial stops the job like generation does (``SynthesizeReport.stopped_by``); what was written is kept.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillgate.data.generate import (
    GatewayTarget,
    GenerateReport,
    GenerateSettings,
    PromptTemplate,
    _Denied,
    _Job,
    agenerate,
    job_lock,
)
from distillgate.data.schema import Row, make_row_id, text_sha256
from distillgate.data.store import WorkingCopy
from distillgate.data.synthetic import most_synthetic
from distillgate.errors import ConfigError, ConfigIssue, SyntheticShareError, UserError
from distillgate.traces import split_message

KINDS = ("hard_negative", "edge_case", "out_of_scope", "adversarial", "balance")
Transform = Literal["empty", "short", "long", "misspelt", "mixed_language", "formatting"]
TRANSFORMS: tuple[str, ...] = ("empty", "short", "long", "misspelt", "mixed_language", "formatting")
DEFAULT_TRANSFORMS: tuple[Transform, ...] = ("short", "long", "misspelt", "mixed_language", "formatting")
WRITTEN_STYLES = ("with several spelling mistakes", "mixing English and Spanish words", "as a very short fragment",
                  "at length, with unneeded detail")
OUTPUT_TYPE = "synthetic_records"
SOURCE_FILE = "synthetic"


# -- configuration ----------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EdgeCases(_Strict):
    transforms: list[Transform] = Field(default_factory=lambda: list(DEFAULT_TRANSFORMS))
    per_transform: int = Field(default=5, ge=0, description="deterministic rows per transform")
    written: int = Field(default=0, ge=0, description="edge cases the teacher rewrites (gateway calls)")


class Balance(_Strict):
    target: Literal["uniform"] | dict[str, float] = Field(
        default="uniform", description="'uniform', or {label: share}: the distribution to fill up to")
    max_new: int = Field(default=50, ge=0, description="at most this many balancing rows")


class SynthesizeConfig(_Strict):
    """What to synthesize (counts per kind) and how to ask the teacher. Every kind is off unless given."""

    seed: int = 0
    hard_negatives: int = Field(default=0, ge=0)
    edge_cases: EdgeCases | None = None
    out_of_scope: int = Field(default=0, ge=0)
    adversarial: int = Field(default=0, ge=0)
    balance: Balance | None = None
    out_of_scope_label: str | None = Field(default=None, description="recorded as the intended label of "
                                           "out-of-scope rows (the teacher still labels them)")
    model: str | None = Field(default=None, description="the generator model (null: the labelling model)")
    temperature: float = Field(default=0.8, ge=0, le=2)
    max_tokens: int = Field(default=48, ge=1)
    concurrency: int = Field(default=4, ge=1, le=64)
    output_type: str = OUTPUT_TYPE


def parse_synthesize_config(data: Any, source: str = "synthesize") -> SynthesizeConfig:
    """Validate a ``synthesize`` mapping; ``ConfigError`` lists every problem."""
    try:
        return SynthesizeConfig.model_validate(data or {})
    except ValidationError as exc:
        issues = [ConfigIssue(".".join(str(p) for p in err["loc"]), err["msg"],
                              "remove it (see docs/dataset.md, 'Synthetic data')"
                              if err["type"] == "extra_forbidden" else "") for err in exc.errors()]
        raise ConfigError(source, issues) from None


# -- generator templates ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratorTemplate:
    """A generator prompt; ``id`` and ``sha256`` (of system + user) are recorded on every row it wrote."""

    id: str
    user: str
    system: str = ("You write realistic messages that users send to an assistant, for a training set. "
                   "Answer with the new message only: no quotes, no explanation.")

    @property
    def sha256(self) -> str:
        return PromptTemplate(id=self.id, user=self.user, system=self.system).sha256

    def messages(self, **values: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user.format(**values)}]


TEMPLATES: dict[str, GeneratorTemplate] = {t.id.split(".")[1]: t for t in (
    GeneratorTemplate("synth.hard_negative.v1",
                      '{input}\n\nThe message above means "{label}". Write one new message that uses similar '
                      'words but means "{other_label}".'),
    GeneratorTemplate("synth.edge_case.v1", "{input}\n\nRewrite the message above {style}, keeping its meaning."),
    GeneratorTemplate("synth.out_of_scope.v1",
                      "{input}\n\nThe assistant handles messages like the one above. Write one message of similar "
                      "length that it cannot handle: it is about none of these topics: {labels}."),
    GeneratorTemplate("synth.adversarial.v1",
                      "{input}\n\nRewrite the message above so that it keeps its meaning but is hard to classify: "
                      "indirect wording, a distracting detail or a negation."),
    GeneratorTemplate("synth.balance.v1",
                      '{input}\n\nThe message above means "{label}". Write one new message that means the same, '
                      "in other words."),
)}


# -- deterministic edge cases -----------------------------------------------------------------------------------
_SPANISH = {"my": "mi", "card": "tarjeta", "account": "cuenta", "money": "dinero", "why": "por qué", "the": "el",
            "is": "es", "have": "tengo", "not": "no", "how": "cómo", "can": "puedo", "payment": "pago",
            "please": "por favor", "help": "ayuda", "when": "cuándo", "where": "dónde", "what": "qué",
            "new": "nuevo", "still": "todavía", "i": "yo", "do": "hago", "transfer": "transferencia",
            "bank": "banco", "it": "lo", "and": "y", "with": "con", "need": "necesito", "want": "quiero"}


def transform_text(name: str, text: str, rng: random.Random, same_label: Sequence[str] = ()) -> str:
    """One deterministic edge-case transformation of ``text`` (``rng`` seeded per row; ``same_label``: other real
    messages of the seed's label, joined after it for ``long``)."""
    words = text.split()
    if name == "empty":
        return ""
    if name == "short":
        return " ".join(words[:2]) if len(words) > 2 else (words[0] if words else "")
    if name == "long":
        return " ".join([text, *same_label])
    if name == "misspelt":  # swap or drop a letter in ~40 % of the longer words (at least one)
        long_words = [i for i, w in enumerate(words) if len(w) > 3]
        hit = {i for i in long_words if rng.random() < 0.4} or set(long_words[:1])
        out = []
        for k, w in enumerate(words):
            if k in hit:
                i = rng.randrange(1, len(w) - 2)
                w = w[:i] + w[i + 1] + w[i] + w[i + 2:] if rng.random() < 0.5 else w[:i] + w[i + 1:]
            out.append(w)
        return " ".join(out)
    if name == "mixed_language":
        return " ".join(_SPANISH.get(w.lower(), w) if rng.random() < 0.7 else w for w in words)
    if name == "formatting":
        style = rng.randrange(4)
        if style == 0:
            return text.upper() + "!!!"
        if style == 1:
            return "   " + "\n\n".join(words) + "\t\n"
        if style == 2:
            return "**" + text + "** ??? 🙏"
        return re.sub(r"\s+", "", text.lower())
    raise UserError(f"unknown edge-case transform {name!r}", hint=f"use one of {', '.join(TRANSFORMS)}")


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One synthetic input to make: by a transform (``transform`` set) or a generator call (``messages``)."""

    input_id: str
    kind: str
    template: GeneratorTemplate | None
    seeds: tuple[Row, ...]
    messages: tuple[dict[str, str], ...] = ()
    transform: str | None = None
    style: str | None = None
    intended_label: str | None = None
    text: str | None = None  # a transform's output (known without a call)


def _task_id(kind: str, template_id: str, seeds: Sequence[Row], variant: str) -> str:
    doc = orjson.dumps([kind, template_id, [s.row_id for s in seeds], variant])
    return f"syn-{kind}-{hashlib.sha256(doc).hexdigest()[:16]}"


def train_seeds(wc: WorkingCopy) -> list[Row]:
    """Real rows the build puts in train (one per input: sample 0), labelled, from a build run in memory."""
    from distillgate.data.pipeline import load_eval_texts, process

    real = [copy.deepcopy(r) for r in wc.rows() if r.synthetic is None]
    if not real:
        return []
    process(real, wc.config, eval_texts=load_eval_texts(wc.config.decontamination, base=wc.root),
            golden_lock=wc.get_meta("golden_lock"), base=wc.root)
    return [r for r in real if r.split == "train" and r.sample_index == 0 and r.label]


def _second(row: Row) -> tuple[str, float] | None:
    probs = sorted((row.label_probs or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    if len(probs) < 2 or probs[0][0] != row.label:
        return None
    return probs[1][0], probs[0][1] - probs[1][1]


def balance_targets(counts: Counter[str], labels: Sequence[str], target: Literal["uniform"] | dict[str, float],
                    max_new: int) -> dict[str, int]:
    """How many new rows each seeded label needs to reach ``target`` (at most ``max_new`` in all, the largest
    deficits first, one at a time)."""
    seeded = [lab for lab in labels if counts[lab]] or sorted(counts)
    if target == "uniform":
        want = {lab: max(counts.values()) for lab in seeded}
    else:
        total = sum(target.values())
        if total <= 0:
            raise UserError("balance.target shares sum to 0", hint="give each label a positive share")
        n = sum(counts.values())
        scale = max((counts[lab] / (share / total) for lab, share in target.items() if share > 0), default=n)
        want = {lab: round(scale * share / total) for lab, share in target.items() if lab in seeded}
    deficit = {lab: max(0, want[lab] - counts[lab]) for lab in want}
    out: Counter[str] = Counter()
    for _ in range(max_new):
        lab = max(deficit, key=lambda k: (deficit[k] - out[k], -seeded.index(k)), default=None)
        if lab is None or deficit[lab] - out[lab] <= 0:
            break
        out[lab] += 1
    return dict(out)


def plan_tasks(seeds: Sequence[Row], cfg: SynthesizeConfig, labels: Sequence[str]) -> tuple[list[Task], list[str]]:
    """The tasks of ``cfg`` over ``seeds`` (deterministic), and notes on what could not be planned."""
    rng = random.Random(cfg.seed)
    notes: list[str] = []
    tasks: list[Task] = []
    by_label: dict[str, list[Row]] = {}
    for s in seeds:
        by_label.setdefault(str(s.label), []).append(s)
    label_text = ", ".join(labels)

    def written(kind: str, picks: Sequence[Row], count: int, intended: Callable[[Row], str | None]) -> None:
        tpl = TEMPLATES[kind]
        for i in range(count):
            seed = picks[i % len(picks)]
            messages = tpl.messages(input=seed.input, label=str(seed.label), labels=label_text)
            tasks.append(Task(_task_id(kind, tpl.id, [seed], f"{cfg.seed}:{i}"), kind, tpl, (seed,),
                              tuple(messages), intended_label=intended(seed)))

    shuffled = list(seeds)
    rng.shuffle(shuffled)
    if cfg.hard_negatives:
        pairs = sorted(((s, p) for s in seeds if (p := _second(s)) is not None), key=lambda sp: (sp[1][1], sp[0].row_id))
        if not pairs:
            raise UserError("hard negatives need the teacher's label distributions, and no seed row has two labels "
                            "with a probability",
                            hint="generate with label scoring (generation.label_scoring: mean / --label-scoring), "
                            "or set hard_negatives: 0")
        tpl = TEMPLATES["hard_negative"]
        for i in range(cfg.hard_negatives):
            seed, (other, _) = pairs[i % len(pairs)]
            tasks.append(Task(_task_id("hard_negative", tpl.id, [seed], f"{cfg.seed}:{i}"), "hard_negative", tpl,
                              (seed,), tuple(tpl.messages(input=seed.input, label=str(seed.label),
                                                          other_label=other)), intended_label=other))
    if cfg.edge_cases is not None and shuffled:
        e = cfg.edge_cases
        for name in e.transforms:
            for i in range(e.per_transform):
                seed = shuffled[(i + TRANSFORMS.index(name) * e.per_transform) % len(shuffled)]
                others = [s for s in by_label.get(str(seed.label), []) if s.row_id != seed.row_id][:6]
                used = (seed, *others) if name == "long" else (seed,)
                row_rng = random.Random(f"{cfg.seed}:{name}:{seed.row_id}")
                text = transform_text(name, seed.input, row_rng, [o.input for o in others])
                tasks.append(Task(_task_id("edge_case", f"transform:{name}", used, str(cfg.seed)), "edge_case",
                                  None, used, transform=name, intended_label=seed.label, text=text))
        tpl = TEMPLATES["edge_case"]
        for i in range(e.written):
            seed = shuffled[i % len(shuffled)]
            style = WRITTEN_STYLES[i % len(WRITTEN_STYLES)]
            tasks.append(Task(_task_id("edge_case", tpl.id, [seed], f"{cfg.seed}:{i}"), "edge_case", tpl, (seed,),
                              tuple(tpl.messages(input=seed.input, style=style)), style=style,
                              intended_label=seed.label))
    if cfg.out_of_scope and shuffled:
        written("out_of_scope", shuffled, cfg.out_of_scope, lambda _: cfg.out_of_scope_label)
    if cfg.adversarial and shuffled:
        written("adversarial", shuffled, cfg.adversarial, lambda seed: seed.label)
    if cfg.balance is not None and seeds:
        counts = Counter(str(s.label) for s in seeds)
        unseeded = [lab for lab in labels if not counts[lab]]
        if unseeded:
            notes.append(f"{len(unseeded)} label(s) have no seed row and cannot be balanced: {unseeded[:5]}")
        tpl = TEMPLATES["balance"]
        for lab, n in balance_targets(counts, labels, cfg.balance.target, cfg.balance.max_new).items():
            pool = by_label[lab]
            for i in range(n):
                seed = pool[i % len(pool)]
                tasks.append(Task(_task_id("balance", tpl.id, [seed], f"{cfg.seed}:{lab}:{i}"), "balance", tpl,
                                  (seed,), tuple(tpl.messages(input=seed.input, label=lab)), intended_label=lab))
    if not seeds:
        notes.append("no seed rows: the working copy has no labelled real rows the build puts in train")
    unique: dict[str, Task] = {}
    for t in tasks:  # the first of each id: a transform of one seed is one task however often it is drawn
        unique.setdefault(t.input_id, t)
    if len(unique) < len(tasks):
        notes.append(f"{len(tasks) - len(unique)} task(s) repeat another (a transform of the same seed): planned once")
    return list(unique.values()), notes


# -- the job ----------------------------------------------------------------------------------------------------
@dataclass
class SynthesizeReport:
    seeds: int = 0
    planned: dict[str, int] = field(default_factory=dict)  # per kind
    added: dict[str, int] = field(default_factory=dict)  # per kind
    already_present: int = 0
    empty: int = 0  # generator answers with no text (nothing stored; a rerun asks again)
    failed: int = 0
    tokens: int = 0
    stopped_by: list[str] = field(default_factory=list)
    stop_status: int | None = None
    stop_message: str | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    labelled: dict[str, Any] = field(default_factory=dict)  # the labelling job's GenerateReport
    seconds: float = 0.0

    @property
    def stopped(self) -> bool:
        return self.stop_status is not None

    def as_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "planned": self.planned, "added": self.added,
                "already_present": self.already_present, "empty": self.empty, "failed": self.failed,
                "tokens": self.tokens, "stopped": self.stopped, "stopped_by": self.stopped_by,
                "stop_status": self.stop_status, "stop_message": self.stop_message, "failures": self.failures,
                "notes": self.notes, "labelled": self.labelled, "seconds": round(self.seconds, 3)}


def clean_generated(text: str | None) -> str:
    """The message in a generator answer: no reasoning trace, header lines, quotes, 'Message:' prefix or trailing
    lines."""
    answer = split_message({"content": text}).answer or ""
    lines = [ln.strip() for ln in answer.strip().splitlines() if ln.strip()]
    while len(lines) > 1 and lines[0].endswith(":"):  # a header line ("Here is a new message:") before the text
        lines.pop(0)
    first = lines[0] if lines else ""
    first = re.sub(r"^(new message|message|rewritten message|rewrite)\s*:\s*", "", first, flags=re.IGNORECASE)
    return first.strip().strip('"“”\'').strip()[:1000]


def _input_row(task: Task, text: str, stamp: dict[str, Any] | None) -> Row:
    tpl_id = task.template.id if task.template is not None else f"transform:{task.transform}"
    seed = task.seeds[0]
    return Row(row_id=make_row_id(task.input_id, 0), input_id=task.input_id, input=text, task=seed.task,
               source_file=SOURCE_FILE, source_record_id=task.input_id, tags=["synthetic", f"synthetic:{task.kind}"],
               input_sha256=text_sha256(text),
               synthetic={"kind": task.kind, "template_id": tpl_id,
                          "template_sha256": task.template.sha256 if task.template is not None else None,
                          "seed_row_ids": [s.row_id for s in task.seeds], "stamp": stamp,
                          "transform": task.transform, "style": task.style, "intended_label": task.intended_label})


async def _write(wc: WorkingCopy, tasks: Sequence[Task], cfg: SynthesizeConfig, gen: GenerateSettings,
                 target: GatewayTarget, report: SynthesizeReport) -> None:
    """Make every task's input: transforms directly, the rest by a generator call through the gateway."""
    made = [_input_row(t, str(t.text), None) for t in tasks if t.template is None]
    for row in made:
        kind = str((row.synthetic or {})["kind"])
        report.added[kind] = report.added.get(kind, 0) + 1
    wc.add_inputs(made)
    calls = [t for t in tasks if t.template is not None]
    if not calls:
        return
    job_report = GenerateReport(planned=len(calls))
    job = _Job(wc, PromptTemplate(id="synthesize", user="{input}"), gen, target, None, None, job_report)
    queue: asyncio.Queue[Task] = asyncio.Queue()
    for item in calls:
        queue.put_nowait(item)

    async def one(task: Task) -> None:
        # the sampling seed follows the task, not its place in this run's queue: a rerun asks the same question
        result = await job._call(list(task.messages), int(task.input_id[-6:], 16))
        if isinstance(result, _Denied):
            if not job.stop.is_set():
                report.stopped_by, report.stop_status, report.stop_message = result.reasons, result.status, \
                    result.message
                job.stop.set()
            return
        stamp = ((result.model_extra or {}).get("distillgate") or {}).get("stamp") if not isinstance(result, str) \
            else None
        if isinstance(result, str) or not isinstance(stamp, dict) or not result.choices:
            report.failed += 1
            if len(report.failures) < 20:
                report.failures.append(f"{task.input_id}: {result if isinstance(result, str) else 'no stamp'}")
            return
        report.tokens += int(result.usage.total_tokens) if result.usage is not None else 0
        text = clean_generated(result.choices[0].message.content)
        if not text:
            report.empty += 1
            return
        wc.add_inputs([_input_row(task, text, stamp)])  # one small transaction per answer, as it arrives
        report.added[task.kind] = report.added.get(task.kind, 0) + 1

    async def worker() -> None:
        while not job.stop.is_set():
            try:
                task = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(task)

    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(calls)))))
    finally:
        await job.client.close()


def synthesize(wc: WorkingCopy, cfg: SynthesizeConfig, *, label_template: PromptTemplate,
               label_settings: GenerateSettings, target: GatewayTarget) -> SynthesizeReport:
    """Write the synthetic inputs ``cfg`` asks for, then label every unlabelled input with ``label_template`` /
    ``label_settings`` (the project's own labelling job: a separate governed call). See the module doc.

    Raises ``SyntheticShareError`` before any call when the plan would exceed ``synthetic.max_train_share``.
    """
    started = time.monotonic()
    report = SynthesizeReport()
    labels = list(label_settings.labels or [])
    seeds = train_seeds(wc)
    report.seeds = len(seeds)
    tasks, report.notes = plan_tasks(seeds, cfg, labels or sorted({str(s.label) for s in seeds}))
    known = {r.input_id for r in wc.inputs()}
    existing = sum(1 for r in wc.inputs() if r.synthetic is not None)
    todo = [t for t in tasks if t.input_id not in known]
    report.already_present = len(tasks) - len(todo)
    for t in tasks:
        report.planned[t.kind] = report.planned.get(t.kind, 0) + 1
    max_share = wc.config.synthetic.max_train_share
    fit = most_synthetic(len(seeds), max_share)
    if existing + len(todo) > fit:
        raise SyntheticShareError(
            f"the plan makes {existing + len(todo)} synthetic input(s) ({len(todo)} new) for {len(seeds)} real "
            f"train input(s): more than synthetic.max_train_share ({max_share:.0%}) allows ({fit}); nothing was "
            "asked of the teacher",
            hint="lower the counts in the synthesize section, add real traffic, or raise "
            "synthetic.max_train_share in the dataset config")
    gen = GenerateSettings(model=cfg.model or label_settings.model, user=label_settings.user, project=label_settings.project,
                           run=label_settings.run, output_type=cfg.output_type, temperature=cfg.temperature,
                           max_tokens=cfg.max_tokens, seed=cfg.seed, concurrency=cfg.concurrency,
                           max_attempts=label_settings.max_attempts, backoff_s=label_settings.backoff_s,
                           timeout_s=label_settings.timeout_s)
    with job_lock(wc.root):
        if todo:
            asyncio.run(_write(wc, todo, cfg, gen, target, report))
        if not report.stopped:
            labelled = asyncio.run(agenerate(wc, label_template, label_settings, target))
            report.labelled = labelled.as_dict()
            if labelled.stopped:
                report.stopped_by, report.stop_status = labelled.stopped_by, labelled.stop_status
                report.stop_message = labelled.stop_message
    report.seconds = time.monotonic() - started
    return report


def discard_synthetic(wc: WorkingCopy, kinds: Sequence[str] | None = None) -> int:
    """Delete synthetic inputs (of ``kinds``; all when None) and their rows. Returns the inputs deleted."""
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise UserError(f"unknown synthetic kind(s) {unknown}", hint=f"kinds: {', '.join(KINDS)}")
    ids = [r.input_id for r in wc.inputs()
           if r.synthetic is not None and (kinds is None or r.synthetic.get("kind") in kinds)]
    return wc.discard_inputs(ids)
