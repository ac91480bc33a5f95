"""The generation job: ask the teacher, through the policy gateway, for ``k`` samples of every ingested input.

    working copy inputs ─render prompt─▶ openai.AsyncOpenAI ──HTTP──▶ gateway ──▶ teacher
           ▲                                                    │ decision log, quota, signed stamp
           └──────── append_generated (one small transaction per answer) ◀───┘

Choices, and why:

- **k samples = k calls with seeds ``seed + sample_index``** (not one call with ``n=k``). Each row then has its own
  decision-log entry, quota charge and stamp whose ``response_hash`` covers exactly that row's answer, and a kill
  loses at most the calls in flight, never ``k - 1`` finished siblings. The sampling settings (incl. the seed) are
  stored on every row.
- **Exactly once**: the work list is ``WorkingCopy.pending_generation(k)`` (pairs with no stored row), every answer
  is stored as soon as it arrives, and row ids are ``{input_id}:{sample_index}``; a rerun only asks for what is
  missing. A kill costs at most the requests in flight (admitted by the gateway, answer not stored).
- **Retries** (own loop, the SDK's are off): 5xx answers (the gateway refunds the reservation), timeouts and
  connection errors, with exponential backoff and full jitter. **Never** a policy denial: a 401/403/429 or a 400
  carrying reason codes stops the job (requests in flight finish and are kept); the report lists the reason codes.
  Other 4xx answers (e.g. 422 ``OUTPUT_FORMAT_VIOLATION``) fail that one row; a rerun retries it.
- **Stale answers are never reused.** Every stored answer carries an *answer key*: the hash of the prompt template
  and of every setting that changes an answer (``answer_key``: model, temperature, top_p, max_tokens, seed,
  log-probabilities, labels, label scoring mode, ``answer_context``, and any setting added later unless it is listed
  in ``OPERATIONAL_SETTINGS``). A run whose key differs from a stored answer's refuses, naming what changed, unless
  asked to regenerate (``stale="regenerate"``), which discards those answers and asks again.
- **Label probabilities**: ``LabelScorer`` is the hook for teachers that can score a label set (the local
  transformers teacher). Without a scorer rows carry no ``label_probs``.

This module is a pure client of the gateway's HTTP API; starting an in-process gateway is the CLI's job
(``distillgate.cli.generate_cmd``), because ``data`` must not import ``gateway``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import random
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillgate.data.schema import Row
from distillgate.data.store import GeneratedSample, WorkingCopy
from distillgate.errors import ConfigError, ConfigIssue, UserError
from distillgate.traces import split_message

#: Row fields a user template may name, besides ``{labels}`` (when labels are configured).
TEMPLATE_FIELDS = ("input", "input_id", "task", "source_file", "source_record_id", "source_group",
                   "source_timestamp", "reference_label", "tags")

#: Reason codes of a denial that means "out of quota" (HTTP 429 from the gateway).
QUOTA_REASONS = frozenset({"TOKENS_PER_DAY_EXCEEDED", "RECORDS_PER_RUN_EXCEEDED"})


# -- prompt template --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplate:
    """System prompt + user template. ``{input}`` and the other ``TEMPLATE_FIELDS`` (and ``{labels}``) are filled.

    ``sha256`` covers the system prompt and the user template (canonical JSON), so any edit is a new template.
    """

    id: str
    user: str
    system: str | None = None

    @property
    def sha256(self) -> str:
        doc = orjson.dumps({"system": self.system, "user": self.user}, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(doc).hexdigest()

    def fields(self) -> set[str]:
        names: set[str] = set()
        for text in (self.system or "", self.user):
            try:
                parsed = list(string.Formatter().parse(text))
            except ValueError as exc:
                raise UserError(f"prompt template {self.id!r} is malformed: {exc}",
                                hint="write {input} for the input; double braces {{ }} for literal braces") from exc
            names |= {name for _, name, _, _ in parsed if name is not None}
        return names

    def check(self, labels: Sequence[str] | None) -> None:
        names = self.fields()
        allowed = set(TEMPLATE_FIELDS) | ({"labels"} if labels else set())
        unknown = sorted(names - allowed)
        if unknown:
            raise UserError(f"prompt template {self.id!r} names unknown field(s) {unknown}",
                            hint=f"use {', '.join('{' + f + '}' for f in sorted(allowed))}"
                            + ("" if labels else "; {labels} needs --labels-file"))
        if "input" not in names:
            raise UserError(f"prompt template {self.id!r} does not contain {{input}}",
                            hint='e.g. --template "Classify this banking message: {input}"')

    def render(self, row: Row, labels: Sequence[str] | None = None) -> list[dict[str, str]]:
        values: dict[str, str] = {}
        for name in TEMPLATE_FIELDS:
            value = getattr(row, name)
            values[name] = ", ".join(value) if isinstance(value, list) else ("" if value is None else str(value))
        if labels:
            values["labels"] = ", ".join(labels)
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system.format_map(values)})
        messages.append({"role": "user", "content": self.user.format_map(values)})
        return messages


# -- settings ---------------------------------------------------------------------------------------------------
class GenerateSettings(BaseModel):
    """What to ask for and how hard to push. Unknown keys are rejected (``parse_settings`` reports all issues)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    user: str
    project: str
    run: str
    output_type: str
    k: int = Field(default=1, ge=1, le=64)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = 0
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    labels: list[str] | None = None
    #: ask the teacher to answer with the most probable of ``labels`` and to return its distribution over them
    #: (the ``label_choices`` extension, served by the local teacher through the gateway): soft labels for KD.
    #: ``true``/``"sum"``: a label scores the sum of its token log-probabilities; ``"mean"``: their mean (long labels
    #: are not penalised for their length)
    label_scoring: bool | Literal["sum", "mean"] = False
    concurrency: int = Field(default=8, ge=1, le=256)
    max_attempts: int = Field(default=4, ge=1, le=20)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=10.0, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    #: anything else that changes an answer but is not sent in the request (the teacher's upstream, a retrieval
    #: pool's hash): part of the answer key only
    answer_context: dict[str, Any] = Field(default_factory=dict)

    def sampling(self, sample_index: int) -> dict[str, Any]:
        """The sampling settings recorded on the row of ``sample_index``."""
        return {"model": self.model, "n": 1, "temperature": self.temperature, "top_p": self.top_p,
                "label_scoring": self.label_scoring,
                "max_tokens": self.max_tokens, "seed": None if self.seed is None else self.seed + sample_index,
                "logprobs": self.logprobs or self.top_logprobs is not None, "top_logprobs": self.top_logprobs,
                "k": self.k}


#: Settings that change who asks, under which policy, or how hard the job pushes, never an answer: left out of the
#: answer key. ``k`` is here because sample ``i`` is asked with seed ``seed + i`` whatever ``k`` is, so raising
#: ``k`` only adds samples.
OPERATIONAL_SETTINGS = frozenset({"user", "project", "run", "output_type", "k", "concurrency", "max_attempts",
                                  "backoff_s", "max_backoff_s", "timeout_s"})


def answer_settings(template: PromptTemplate, settings: GenerateSettings) -> dict[str, Any]:
    """What an answer depends on: the prompt template's hash and every non-operational setting."""
    doc = {k: v for k, v in settings.model_dump().items() if k not in OPERATIONAL_SETTINGS}
    return {"template_sha256": template.sha256, **doc}


def answer_key(template: PromptTemplate, settings: GenerateSettings) -> str:
    """The hash stored with every answer (``sampling.answer_key``); a differing key marks a stale answer."""
    return hashlib.sha256(orjson.dumps(answer_settings(template, settings), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _legacy_matches(row: Row, template: PromptTemplate, settings: GenerateSettings) -> bool:
    """A row stored before answer keys existed: compare what it recorded (model, template, sampling)."""
    recorded = row.sampling or {}
    wanted = settings.sampling(row.sample_index)
    same = all(recorded.get(k) == wanted[k] for k in ("temperature", "top_p", "max_tokens", "seed", "top_logprobs",
                                                        "label_scoring") if k in recorded)
    return same and row.teacher_model == settings.model and row.prompt_template_sha256 == template.sha256


def stale_rows(wc: WorkingCopy, template: PromptTemplate, settings: GenerateSettings) -> list[Row]:
    """Generated rows whose answer was asked for with other settings (or another prompt) than these."""
    key = answer_key(template, settings)
    stale = []
    for row in wc.rows():
        if row.stamp is None or row.sampling is None:
            continue  # an answer that came with the traffic, not from a generation job
        stored = row.sampling.get("answer_key")
        matches = stored == key if stored is not None else _legacy_matches(row, template, settings)
        if not matches:
            stale.append(row)
    return stale


def _what_changed(previous: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    if not previous or "answer_settings" not in previous:
        return []
    before = previous["answer_settings"]
    named = {"template_sha256": "the prompt template changed", "labels": "the label set changed"}
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    return [named.get(k) or f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed]


def parse_settings(data: Mapping[str, Any], source: str = "generation settings") -> GenerateSettings:
    try:
        return GenerateSettings.model_validate(dict(data))
    except ValidationError as exc:
        issues = [ConfigIssue(".".join(str(p) for p in err["loc"]), err["msg"],
                              "remove it" if err["type"] == "extra_forbidden" else "") for err in exc.errors()]
        raise ConfigError(source, issues) from exc


@dataclass(frozen=True)
class GatewayTarget:
    """Where the gateway listens (``http://host:port/v1``) and the API key to present."""

    base_url: str
    api_key: str


class LabelScorer(Protocol):
    """Hook: a teacher that can score a label set returns ``{label: probability}`` for one prompt.

    Called once per stored sample when ``settings.labels`` is set. ``distillgate.teachers`` has no label scoring on
    this branch yet; pass an object with this method (e.g. the local transformers teacher once it has one).
    """

    async def score(self, messages: Sequence[Mapping[str, str]], labels: Sequence[str]) -> dict[str, float] | None:
        ...


# -- report -----------------------------------------------------------------------------------------------------
@dataclass
class GenerateReport:
    """What a run did. ``stopped_by`` holds the reason codes of the denial that stopped it (empty: not stopped)."""

    planned: int = 0  # inputs × k
    already_present: int = 0  # rows stored before this run (or by a concurrent run)
    added: int = 0
    denied: int = 0  # requests the gateway denied (the first stops the job)
    failed: int = 0  # rows given up on after retries or a non-policy 4xx; a rerun retries them
    retried: int = 0  # retry attempts made
    tokens: int = 0  # total tokens the gateway reported for stored rows
    stopped_by: list[str] = field(default_factory=list)
    stop_status: int | None = None
    stop_message: str | None = None
    discarded: int = 0  # stale answers (asked with other settings) discarded before generating again
    failures: list[str] = field(default_factory=list)  # first few failure messages
    seconds: float = 0.0

    @property
    def stopped(self) -> bool:
        return self.stop_status is not None

    @property
    def quota_stop(self) -> bool:
        return bool(QUOTA_REASONS & set(self.stopped_by))

    def as_dict(self) -> dict[str, Any]:
        return {"planned": self.planned, "already_present": self.already_present, "added": self.added,
                "denied": self.denied, "failed": self.failed, "retried": self.retried, "tokens": self.tokens,
                "stopped": self.stopped, "stopped_by": self.stopped_by, "stop_status": self.stop_status,
                "stop_message": self.stop_message, "discarded": self.discarded, "failures": self.failures, "seconds": round(self.seconds, 3)}


ProgressFn = Callable[[int, int], None]  # (rows added now, tokens now) -> None


@dataclass(frozen=True)
class _Denied:
    status: int
    reasons: list[str]
    message: str


def _error_body(exc: Any) -> dict[str, Any]:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    return body if isinstance(body, dict) else {}


def _top_logprobs(choice: Any) -> list[list[dict[str, Any]]] | None:
    lp = getattr(choice, "logprobs", None)
    content = getattr(lp, "content", None) if lp is not None else None
    if not content:
        return None
    steps: list[list[dict[str, Any]]] = []
    for tok in content:
        alts = [{"token": a.token, "logprob": a.logprob} for a in (tok.top_logprobs or [])]
        steps.append(alts or [{"token": tok.token, "logprob": tok.logprob}])
    return steps


# -- the job ----------------------------------------------------------------------------------------------------
class _Job:
    def __init__(self, wc: WorkingCopy, template: PromptTemplate, settings: GenerateSettings, target: GatewayTarget,
                 scorer: LabelScorer | None, on_progress: ProgressFn | None, report: GenerateReport) -> None:
        import openai

        self.wc = wc
        self.template = template
        self.settings = settings
        self.target = target
        self.scorer = scorer
        self.on_progress = on_progress
        self.report = report
        self.stop = asyncio.Event()
        self.client = openai.AsyncOpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=0,
                                         timeout=settings.timeout_s)
        self.headers = {"X-Policy-User": settings.user, "X-Policy-Project": settings.project,
                        "X-Policy-Run": settings.run, "X-Policy-Output-Type": settings.output_type,
                        # what the whole run asks for (inputs x k): the extraction monitor's volume signal
                        "X-Policy-Run-Size": str(report.planned)}
        self.template_sha = template.sha256
        self.answer_key = answer_key(template, settings)

    def _request(self, messages: list[dict[str, str]], sample_index: int) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"model": s.model, "messages": messages, "n": 1, "extra_headers": self.headers}
        sampling = s.sampling(sample_index)
        for key in ("temperature", "top_p", "max_tokens", "seed", "top_logprobs"):
            if sampling[key] is not None:
                body[key] = sampling[key]
        if sampling["logprobs"]:
            body["logprobs"] = True
        if s.label_scoring and s.labels:
            body["extra_body"] = {"label_choices": list(s.labels)}
            if s.label_scoring == "mean":
                body["extra_body"]["label_score"] = "mean"
            body.pop("top_logprobs", None)
            body.pop("logprobs", None)
        return body

    async def _call(self, messages: list[dict[str, str]], sample_index: int) -> Any:
        """One answer, or a ``_Denied``, or None (failed after retries). Retries never cover policy denials."""
        import openai

        s = self.settings
        last = ""
        for attempt in range(s.max_attempts):
            if attempt:
                self.report.retried += 1
                await asyncio.sleep(random.uniform(0, min(s.max_backoff_s, s.backoff_s * 2 ** (attempt - 1))))
            try:
                return await self.client.chat.completions.create(**self._request(messages, sample_index))
            except openai.APIStatusError as exc:
                err = _error_body(exc)
                reasons = [str(r) for r in err.get("reasons") or []]
                message = str(err.get("message") or exc.message)
                if reasons and exc.status_code in (400, 401, 403, 429):
                    return _Denied(exc.status_code, reasons, message)
                if exc.status_code >= 500 or exc.status_code == 429:
                    last = f"HTTP {exc.status_code}: {message}"
                    continue
                return f"HTTP {exc.status_code}{' ' + ','.join(reasons) if reasons else ''}: {message}"
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                last = f"{type(exc).__name__}: {exc}"
                continue
        return f"gave up after {s.max_attempts} attempts: {last}"

    async def _one(self, row: Row, sample_index: int) -> None:
        messages = self.template.render(row, self.settings.labels)
        result = await self._call(messages, sample_index)
        if isinstance(result, _Denied):
            self.report.denied += 1
            if not self.stop.is_set():
                self.report.stopped_by = result.reasons
                self.report.stop_status = result.status
                self.report.stop_message = result.message
                self.stop.set()
            return
        if isinstance(result, str):
            self.report.failed += 1
            if len(self.report.failures) < 20:
                self.report.failures.append(f"{row.input_id}:{sample_index}: {result}")
            return
        await self._store(row, sample_index, messages, result)

    async def _store(self, row: Row, sample_index: int, messages: list[dict[str, str]], resp: Any) -> None:
        extra = resp.model_extra or {}
        meta = extra.get("distillgate")
        stamp = meta.get("stamp") if isinstance(meta, dict) else None
        if not isinstance(stamp, dict) or not resp.choices:
            self.report.failed += 1
            msg = (f"{row.input_id}:{sample_index}: the answer from {self.target.base_url} carries no distillgate "
                   "provenance stamp (is it a distillgate gateway?)")
            if len(self.report.failures) < 20:
                self.report.failures.append(msg)
            return
        choice = resp.choices[0]
        served = (choice.model_extra or {}).get("label_probs")
        label_probs = {str(k): float(v) for k, v in served.items()} if isinstance(served, dict) else None
        if label_probs is None and self.scorer is not None and self.settings.labels:
            label_probs = await self.scorer.score(messages, self.settings.labels)
        sampling = self.settings.sampling(sample_index)
        sampling["finish_reason"] = choice.finish_reason
        sampling["answer_key"] = self.answer_key
        # a reasoning trace (reasoning_content / reasoning / a leading <think> block) is kept apart from the answer,
        # so the answer is normalised as if the teacher had not thought aloud (distillgate.traces)
        traced = split_message({**(choice.message.model_extra or {}), "content": choice.message.content})
        if traced.trace is not None:  # the trace itself is the row's ``trace``; how it came, here
            sampling["reasoning"] = {k: v for k, v in traced.as_dict().items() if k != "trace"}
        card = {"model_id": resp.model, "backend": "openai-compatible via distillgate gateway",
                "file_sha256": None, "quantisation": None, "chat_template_sha256": None, "parameter_count": None,
                "system_fingerprint": resp.system_fingerprint}
        sample = GeneratedSample(
            input_id=row.input_id, sample_index=sample_index, output_raw=traced.answer,
            teacher_model=self.settings.model, teacher_card=card, prompt_template_id=self.template.id,
            prompt_template_sha256=self.template_sha, sampling=sampling, stamp=stamp, label_probs=label_probs,
            top_logprobs=_top_logprobs(choice), trace=traced.trace)
        result = self.wc.append_generated([sample])  # one small transaction per answer, as it arrives
        tokens = int(resp.usage.total_tokens) if resp.usage is not None else 0
        self.report.added += result.added
        self.report.already_present += result.already_present
        self.report.tokens += tokens
        if self.on_progress is not None:
            self.on_progress(result.added + result.already_present, tokens)

    async def run(self, pending: list[tuple[Row, int]]) -> None:
        queue: asyncio.Queue[tuple[Row, int]] = asyncio.Queue()
        for item in pending:
            queue.put_nowait(item)

        async def worker() -> None:
            while not self.stop.is_set():
                try:
                    row, index = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._one(row, index)

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.settings.concurrency, len(pending)) or 1)))
        finally:
            await self.client.close()


async def agenerate(wc: WorkingCopy, template: PromptTemplate, settings: GenerateSettings, target: GatewayTarget,
                    *, label_scorer: LabelScorer | None = None, on_progress: ProgressFn | None = None,
                    on_start: Callable[[int, int], None] | None = None,
                    stale: Literal["refuse", "regenerate"] = "refuse") -> GenerateReport:
    """Generate every missing (input, sample) of ``wc`` through the gateway at ``target``; see the module doc.

    ``on_start(total, already_present)`` is called once with the work size; ``on_progress(rows, tokens)`` after
    each stored answer. Never raises for a denial: read ``report.stopped_by``. Stored answers asked for with other
    settings raise ``UserError`` (``stale="refuse"``) or are discarded and asked again (``"regenerate"``).
    """
    template.check(settings.labels)
    if wc.count_inputs() == 0:
        raise UserError(f"{wc.root} has no inputs to generate for",
                        hint="ingest traffic first (`distillgate dataset ingest`) or pass --traffic FILE")
    started = time.monotonic()
    now = answer_settings(template, settings)
    old = stale_rows(wc, template, settings)
    discarded = 0
    if old:
        changed = _what_changed(wc.get_meta("generate"), now)
        what = f" ({'; '.join(changed)})" if changed else ""
        if stale == "refuse":
            reviewed = sum(r.review_state != "unreviewed" for r in old)
            raise UserError(
                f"{len(old)} stored teacher answer(s) in {wc.root} were generated with other settings{what}; "
                "reusing them would pass them off as answers to these settings",
                hint="rerun with --regenerate to discard them and ask the teacher again"
                + (f" ({reviewed} of them carry a review, which is discarded too)" if reviewed else "")
                + ", or generate into a new dataset directory")
        discarded = wc.discard_rows([r.row_id for r in old])
    pending = wc.pending_generation(settings.k)
    report = GenerateReport(planned=wc.count_inputs() * settings.k, discarded=discarded)
    report.already_present = report.planned - len(pending)
    wc.set_meta("generate", {"template_id": template.id, "template_sha256": template.sha256,
                             "settings": settings.model_dump(), "answer_key": answer_key(template, settings),
                             "answer_settings": now})
    if on_start is not None:
        on_start(report.planned, report.already_present)
    if pending:
        await _Job(wc, template, settings, target, label_scorer, on_progress, report).run(pending)
    report.seconds = time.monotonic() - started
    return report


LOCK_FILE = "generate.lock"


@contextlib.contextmanager
def job_lock(root: Path) -> Iterator[None]:
    """One generation job per working copy at a time (two would spend quota twice for the same rows).

    An ``flock`` on ``<dir>/generate.lock``: the OS drops it when the process dies, even by SIGKILL.
    """
    path = Path(root) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"another generation job (pid {holder}) is running on {root}",
                            hint="wait for it to finish, or stop it; a rerun then resumes where it stopped") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def generate(wc: WorkingCopy, template: PromptTemplate, settings: GenerateSettings, target: GatewayTarget,
             *, label_scorer: LabelScorer | None = None, on_progress: ProgressFn | None = None,
             on_start: Callable[[int, int], None] | None = None,
             stale: Literal["refuse", "regenerate"] = "refuse") -> GenerateReport:
    """Synchronous wrapper of ``agenerate`` (runs its own event loop), holding the working copy's job lock."""
    with job_lock(wc.root):
        return asyncio.run(agenerate(wc, template, settings, target, label_scorer=label_scorer,
                                     on_progress=on_progress, on_start=on_start, stale=stale))
