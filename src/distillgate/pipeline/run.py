"""``distillgate run PROJECT.yaml``: a whole governed distillation study, stage by stage.

    generate → synthesize → build → freeze → train → eval → promote → report → export

(``synthesize`` runs only when the project file has a ``synthesize:`` section.)

Every teacher call (generation and evaluation) goes through the policy gateway (started in-process on loopback
unless ``gateway.url`` names one), so quotas, the decision log and provenance stamps cover the whole study. Each
stage is skipped when its fingerprint (its configuration, its inputs' content hashes and the fingerprints of the
stages before it) matches the last completed run of that stage, so a rerun after a crash or an edit redoes only what
changed. ``--from STAGE`` reruns from a stage on; ``--only STAGE`` runs one stage (its inputs must exist).

The ``promote`` stage judges the student on the eval stage's metrics against the policy's promotion gates and the
project's ``promote.gates`` (``evals.promotion.promote``). A denial is a logged, reason-coded decision and a finding
of the report, not a crash: the report and export still run, and the run exits 0 unless ``promote.required`` is
true, in which case ``distillgate run`` exits 2 after the report (``promotion_denied``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from distillgate.canonical import sha256_file
from distillgate.db import is_postgres
from distillgate.errors import NotFoundError, PolicyDenied, UpstreamError, UserError
from distillgate.pipeline.cache import StageCache, StageRecord, fingerprint
from distillgate.pipeline.project import Project
from distillgate.policy.decision import Request
from distillgate.policy.model import PolicySet, load_policies
from distillgate.progress import PlainProgress

STAGES = ("generate", "synthesize", "build", "freeze", "train", "eval", "promote", "report", "export")


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" | "cached" | "skipped"
    seconds: float
    summary: str
    outputs: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # user + sys of this process (every thread) while the stage ran


def default_system_prompt(labels: list[str]) -> str:
    """The teacher's default instruction: pick one of the task's labels (no domain named), the same words the
    evaluation suites use, so generation and evaluation ask the same question."""
    from distillgate.evals.suites import Item, Suite

    suite = Suite("task", "classification", [], labels)
    return suite.messages(Item("x", "x", None))[0]["content"]


class Pipeline:
    #: seconds between plain progress lines when the console is not a terminal
    progress_every_s = 30.0

    def __init__(self, project: Project, doc: dict[str, Any], base: Path, *, console: Console | None = None,
                 project_file: Path | None = None) -> None:
        self.project = project
        self.doc = doc
        self.base = base
        self.project_file = project_file
        self.console = console or Console(stderr=True)
        self.workdir = project.path(base, project.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        #: the store: a SQLite file (relative to the project file) or a PostgreSQL URL, passed on as written
        self.store_path: str | Path = (project.store if project.store and is_postgres(project.store) else
                                       project.path(base, project.store) if project.store else
                                       self.workdir / "distillgate.db")
        self.policy_path = project.path(base, project.policy)
        self.policies: PolicySet = load_policies(self.policy_path)
        self.labels: list[str] = json.loads(project.path(base, project.task.labels_file).read_text())
        self.teacher_system = project.task.teacher_system_prompt or default_system_prompt(self.labels)
        self.student_system = project.task.student_system_prompt or self.teacher_system
        self.cache = StageCache(self.workdir)
        self._stack = contextlib.ExitStack()
        self._target: Any = None
        self.records: dict[str, StageRecord] = {}

    # -- shared services ------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._stack.close()

    def gateway(self) -> Any:
        """A GatewayTarget (base URL + API key): the configured gateway, or one started in this process."""
        if self._target is not None:
            return self._target
        from distillgate.data.generate import GatewayTarget

        p = self.project
        if p.gateway.url:
            key = os.environ.get(p.gateway.api_key_env)
            if not key:
                raise UserError(f"gateway.url is set but ${p.gateway.api_key_env} is empty",
                                hint="export the API key from `distillgate keys create`")
            self._target = GatewayTarget(base_url=p.gateway.url, api_key=key)
            return self._target
        from distillgate.gateway.inprocess import local_gateway

        data: dict[str, Any] = {"policy": str(self.policy_path), "db": str(self.store_path)}
        if p.teacher.upstream:
            upstream: dict[str, Any] = {"base_url": p.teacher.upstream, "timeout_s": p.teacher.timeout_s}
            if os.environ.get(p.teacher.api_key_env):
                upstream["api_key_env"] = p.teacher.api_key_env
            else:
                self.console.print(f"[yellow]note:[/] ${p.teacher.api_key_env} is empty; calling the upstream "
                                   "without an API key")
            data["upstreams"] = {"teacher": upstream}
            data["models"] = {p.teacher.model: "teacher"}
        elif p.teacher.model.startswith("local/"):  # the project's own local teacher: register it by name
            name = p.teacher.model.removeprefix("local/")
            if name != "smollm2-135m-instruct":
                data["local_models"] = {name: p.teacher.model}
        from distillgate.pipeline.teacher import teacher_loader

        self._target = self._stack.enter_context(local_gateway(data, p.user, teacher_loader(self)))
        return self._target

    def judge(self, request: Request) -> None:
        """Ask the policy (and log the answer) for a non-inference action: dataset use, export destination."""
        from distillgate.ledger.store import Store

        with Store.open(self.store_path) as store:
            adm = store.admit(self.policies, request)
        if not adm.decision.allowed:
            raise PolicyDenied(f"{request.kind} denied by policy {adm.decision.policy_id!r}: {adm.decision.message}",
                               adm.decision.reasons)

    def _progress(self) -> Progress:
        return Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=self.console, transient=True)

    # -- stages ---------------------------------------------------------------------------------------------------
    def pool_sha256(self) -> str | None:
        """The retrieval teacher's example pool file, by content (an edited pool changes answers)."""
        r = self.project.teacher.retrieval
        return sha256_file(self.project.path(self.base, r.pool.path)) if r is not None else None

    def fp_generate(self) -> str:
        p = self.project
        rubric = p.dataset.get("rubric")  # grading runs in this stage: a rubric edit regrades (absent: no part)
        return fingerprint("generate", p.teacher.model_dump(), p.task.model_dump(), p.traffic.model_dump(),
                           sha256_file(p.path(self.base, p.traffic.path)), p.generation.model_dump(), p.run_id,
                           p.project, p.user, self.teacher_system, self.pool_sha256(),
                           *([{"rubric": rubric}] if rubric else []))

    def dataset_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = _resolve_paths(json.loads(json.dumps(self.project.dataset)), self.base)
        ingest = cfg.setdefault("ingest", {})
        ingest["columns"] = {"record_id": "_record", **self.project.traffic.columns}
        ingest["format"] = "jsonl"  # the pipeline ingests its own sample file
        return cfg

    def working_copy(self) -> Any:
        from distillgate.data.store import CONFIG_FILE, WorkingCopy

        root = self.workdir / "dataset"
        config = self.dataset_config()
        if (root / "working.sqlite").exists():
            (root / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
            return WorkingCopy.open(root)
        return WorkingCopy.create(root, config)

    def sample_traffic(self) -> Path:
        from distillgate.data.ingest import read_records

        t = self.project.traffic
        records = list(read_records(self.project.path(self.base, t.path), t.format))
        for i, record in enumerate(records):
            record.setdefault("_record", str(i))
        if t.limit is not None and t.limit < len(records):
            picked = sorted(random.Random(t.seed).sample(range(len(records)), t.limit))
            records = [records[i] for i in picked]
        out = self.workdir / "traffic.sample.jsonl"
        out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
        return out

    def label_job(self) -> tuple[Any, Any]:
        """The labelling job's prompt template and settings (generation, and the labels of synthetic inputs)."""
        from distillgate.data.generate import PromptTemplate, parse_settings

        p = self.project
        template = PromptTemplate(id=p.task.template_id, user=p.task.template, system=self.teacher_system)
        g = p.generation
        settings = parse_settings({
            "model": p.teacher.model, "user": p.user, "project": p.project, "run": p.run_id,
            "output_type": p.task.output_type, "k": g.k, "temperature": g.temperature,
            "max_tokens": g.max_tokens, "seed": g.seed, "logprobs": g.top_logprobs is not None,
            "top_logprobs": g.top_logprobs, "labels": self.labels, "concurrency": g.concurrency,
            "label_scoring": g.label_scoring,
            "timeout_s": p.teacher.timeout_s,
            # what changes an answer without being in the request: which teacher serves the model name
            "answer_context": {"teacher": p.teacher.model_dump(exclude={"timeout_s", "api_key_env"}),
                               "pool_sha256": self.pool_sha256()},
        }, "generation")
        return template, settings

    def stage_generate(self) -> StageOutcome:
        from distillgate.data.generate import generate
        from distillgate.data.ingest import ingest_file

        p = self.project
        if p.traffic.dataset_source:
            self.judge(Request(user=p.user, project=p.project, run=p.run_id, output_type=None, kind="dataset",
                               dataset_source=p.traffic.dataset_source))
        sample = self.sample_traffic()
        with self.working_copy() as wc:
            ingested = ingest_file(sample, wc.config.ingest)
            new, known = wc.add_inputs(ingested.rows)
            template, settings = self.label_job()
            target = self.gateway()
            start = time.monotonic()
            plain = PlainProgress("teacher generation", "answers", self.console, self.progress_every_s)
            with self._progress() as progress:
                task = progress.add_task("teacher generation", total=None, rate="")

                def on_start(total: int, already: int) -> None:
                    progress.update(task, total=max(total, 1), completed=already)
                    plain.start(total, already)

                spent = [0]

                def on_progress(rows_now: int, tokens_now: int) -> None:  # called once per stored answer
                    spent[0] += tokens_now
                    rate = f"{spent[0] / max(time.monotonic() - start, 1e-9):,.0f} tok/s"
                    progress.update(task, advance=rows_now, rate=rate)
                    plain.advance(rows_now, rate)

                # the stage reruns because its fingerprint changed: answers asked with the old settings are
                # discarded and asked again, never reused (the summary says how many)
                report = generate(wc, template, settings, target, on_progress=on_progress, on_start=on_start,
                                  stale="regenerate")
            if report.stopped:
                raise PolicyDenied(f"generation stopped by the gateway: {report.stop_message}",
                                   list(report.stopped_by or []),
                                   hint="the rows stored so far are kept; rerun after fixing the cause")
            if report.failed:
                raise UpstreamError(f"{report.failed} generation call(s) failed: {report.failures[:1]}",
                                    hint="rerun: stored rows are kept and only the missing ones are asked for")
            graded = self.grade_answers(wc, target)
            rows = wc.count_rows()
        stale = f", {report.discarded} stale ones (other settings) discarded" if report.discarded else ""
        return StageOutcome("generate", "ran", 0, f"{new} new inputs ({known} known); {report.added} teacher "
                            f"answers added{stale}, {report.already_present} already stored; "
                            f"{report.tokens:,} tokens"
                            + (f"; {graded['graded']} graded, {graded['unparsed']} unparsed" if graded else ""),
                            {"rows": rows, "report": report.as_dict(), "dataset_dir": str(self.workdir / "dataset"),
                             "grading": graded})

    def grade_answers(self, wc: Any, target: Any) -> dict[str, Any] | None:
        """Grade the answers against the dataset's rubric (``dataset.rubric``), through the same gateway."""
        from distillgate.data.grade import grade

        rubric = wc.config.rubric
        if rubric is None:
            return None
        p = self.project
        report = grade(wc, rubric, target, model=rubric.model or p.teacher.model, user=p.user, project=p.project,
                       run=p.run_id, timeout_s=p.teacher.timeout_s)
        if report.stopped_by:
            raise PolicyDenied(f"grading stopped by the gateway: {report.stop_message}", list(report.stopped_by),
                               hint=f"allow the output type {rubric.output_type!r} in the policy; the answers and "
                                    "the grades so far are kept")
        if report.failed:
            raise UpstreamError(f"{report.failed} grading call(s) failed: {report.failures[:1]}",
                                hint="rerun: only the answers without a grade are asked again")
        return report.as_dict()

    def stage_synthesize(self) -> StageOutcome:
        from distillgate.data.synthesize import synthesize

        p = self.project
        if p.synthesize is None:
            return StageOutcome("synthesize", "skipped", 0, "no synthesize section in the project file")
        cfg = p.synthesize
        if cfg.out_of_scope_label is None and p.task.out_of_scope_label is not None:
            cfg = cfg.model_copy(update={"out_of_scope_label": p.task.out_of_scope_label})
        template, settings = self.label_job()
        with self.working_copy() as wc:
            report = synthesize(wc, cfg, label_template=template, label_settings=settings, target=self.gateway())
            synthetic = sum(r.synthetic is not None for r in wc.inputs())
            # with a rubric, the synthetic rows' answers are graded like the real ones (only ungraded are asked)
            graded = self.grade_answers(wc, self.gateway()) if not report.stopped else None
        if report.stopped:
            raise PolicyDenied(f"synthesis stopped by the gateway: {report.stop_message}", list(report.stopped_by),
                               hint="the synthetic rows written so far are kept; rerun after fixing the cause")
        if report.failed or report.labelled.get("failed"):
            raise UpstreamError(f"{report.failed} generator call(s) and {report.labelled.get('failed', 0)} "
                                f"labelling call(s) failed: {report.failures[:1]}",
                                hint="rerun: what is stored is kept and only the missing ones are asked for")
        added = ", ".join(f"{k}={v}" for k, v in report.added.items()) or "nothing new"
        return StageOutcome("synthesize", "ran", 0, f"{report.seeds} seed rows; added {added} "
                            f"({report.already_present} already present, {report.empty} empty); {synthetic} "
                            f"synthetic inputs in all, {report.tokens:,} generator tokens",
                            {"report": report.as_dict(), "synthetic_inputs": synthetic, "grading": graded})

    def stage_build(self) -> StageOutcome:
        from distillgate.data.pipeline import build

        with self.working_copy() as wc:
            report = build(wc)
            rows = wc.rows()
        passed = sum(r.filter_status == "pass" for r in rows)
        splits: dict[str, int] = {}
        for r in rows:
            splits[str(r.split)] = splits.get(str(r.split), 0) + 1
        leak = report.leakage
        train = report.synthetic.get("by_split", {}).get("train", {})
        mix = (f"; train {train['real']} real + {train['synthetic']} synthetic" if train.get("synthetic") else "")
        return StageOutcome("build", "ran", 0, f"{passed}/{len(rows)} rows pass the filters; splits "
                            + ", ".join(f"{k}={v}" for k, v in sorted(splits.items())) + mix,
                            {"passed": passed, "rows": len(rows), "splits": splits, "synthetic": report.synthetic,
                             "leakage": getattr(leak, "hits", None) if leak is not None else None})

    def stage_freeze(self) -> StageOutcome:
        from distillgate.data.versions import HEAD, diff_rows, freeze, open_version

        with self.working_copy() as wc:
            head = open_version(wc.root) if (wc.root / HEAD).exists() else None
            if head is not None and not diff_rows(head.rows, wc.rows()):
                version = head  # unchanged since HEAD (e.g. frozen by a sign-off): its sign-offs stay valid
            else:
                version = freeze(wc, notes=f"distillgate run {self.project.name} (run {self.project.run_id})")
        return StageOutcome("freeze", "ran", 0, f"dataset version {version.version_id[:16]}",
                            {"version_id": version.version_id, "version_dir": str(version.path),
                             "files": {"manifest": str(version.path / "manifest.json")}})

    def train_config(self, version: dict[str, Any], output_dir: Path | None = None) -> dict[str, Any]:
        cfg: dict[str, Any] = _resolve_paths(json.loads(json.dumps(self.project.train)), self.base)
        prompt = cfg.setdefault("prompt", {})
        prompt.setdefault("system", self.student_system)
        prompt.setdefault("template", self.project.task.template)
        cfg.setdefault("labels", self.labels)
        cfg["dataset"] = version["version_dir"]  # the frozen version itself: never a copied rows file
        cfg["output_dir"] = str(output_dir or self.workdir / "train")
        cfg["dataset_version"] = version["version_id"]
        return cfg

    def trained_version(self) -> dict[str, Any]:
        """The version training uses: the working copy's HEAD (a sign-off on the review page may have frozen the
        reviewed copy after the freeze stage), else the freeze stage's."""
        from distillgate.data.versions import HEAD, resolve_version

        root = self.workdir / "dataset"
        if (root / HEAD).exists():
            path = resolve_version(root)
            manifest = orjson.loads((path / "manifest.json").read_bytes())
            return {"version_id": manifest["version_id"], "version_dir": str(path)}
        return self.require("freeze")

    def gate(self, kind: str, version_id: str | None, *, artifact: str | None = None,
             destination: str | None = None) -> dict[str, Any]:
        """Judge (and log) a train / promote / export step: the shared check of ``distillgate.data.gate``."""
        from distillgate.data.gate import judge
        from distillgate.ledger.store import Store

        p = self.project
        with Store.open(self.store_path) as store:
            admission = judge(store, self.policies, kind=kind, user=p.user, project=p.project, run=p.run_id,
                              version_id=version_id, artifact=artifact, destination=destination)
        return {"decision_index": admission.entry.index, "reasons": list(admission.decision.reasons)}

    def signoff_indexes(self) -> list[int]:
        """Log indexes of the run's sign-offs of the trained version (what a promotion's sign-off rule reads)."""
        version_id = self.trained_version_id()
        return [int(s["index"]) for s in self.signoffs(version_id)] if version_id else []

    def signoffs(self, version_id: str | None = None) -> list[dict[str, Any]]:
        from distillgate.data.signoff import signoffs
        from distillgate.ledger.store import Store

        with Store.open(self.store_path) as store:
            return [so.as_dict() for so in signoffs(store, project=self.project.project, run=self.project.run_id,
                                                    version_id=version_id)]

    def stage_train(self) -> StageOutcome:
        from distillgate.train import run_recipe
        from distillgate.train.config import parse_config

        version = self.trained_version()
        gate = self.gate("train", version["version_id"])
        config = parse_config(self.train_config(version), "train")
        result = run_recipe(config)
        record = orjson.loads(result.record_path.read_bytes())
        record["provenance"] = self.student_card(version["version_id"], gate)
        result.record_path.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        rows = record["dataset"]["n_rows"]
        out = Path(config.output_dir)
        outputs: dict[str, Any] = {
            "model_dir": str(result.model_dir), "record": str(result.record_path), "rows": rows,
            "steps": result.steps, "final_loss": result.final_loss, "recipe": config.recipe,
            "family": config.student.family, "train_seconds": result.seconds,
            "version_id": version["version_id"], "version_dir": version["version_dir"],
            "files": {"model": str(result.model_dir), "record": str(result.record_path)}}
        summary = (f"{config.student.family} {config.recipe} on {rows} rows, {result.steps} steps, final loss "
                   f"{result.final_loss:.4f}, {result.seconds:.0f}s")
        baseline = self.project.compare.recipe if self.project.compare is not None else None
        if baseline is not None and baseline != config.recipe:
            # the comparison student: same family, rows, seed and schedule; only the recipe differs
            cfg = self.train_config(version, out / f"baseline-{baseline}")
            cfg["recipe"] = baseline
            base = run_recipe(parse_config(cfg, "train (compare)"))
            outputs["baseline"] = {"recipe": baseline, "model_dir": str(base.model_dir),
                                   "record": str(base.record_path), "steps": base.steps,
                                   "final_loss": base.final_loss, "train_seconds": base.seconds}
            outputs["files"]["baseline_model"] = str(base.model_dir)
            summary += f"; baseline {baseline}: {base.steps} steps, {base.seconds:.0f}s"
        return StageOutcome("train", "ran", 0, summary, outputs)

    def suite(self, spec: Any, version: dict[str, Any], rows: Callable[[], list[dict[str, Any]]] | None = None) -> Any:
        """The suite ``spec`` names: the project's own split (default), a labelled file, or XSTest refusals.
        ``rows`` gives the version's rows (read once by the caller); without it they are read here."""
        from distillgate.evals.suites import load_xstest, project_suite

        p = self.project
        if spec.name == "xstest":
            return load_xstest(sample=spec.sample, seed=spec.seed, max_tokens=spec.max_tokens or 96)
        if spec.name == "harmful":
            from distillgate.evals.harmful import load_harmful

            return load_harmful(sample=spec.sample, seed=spec.seed, max_tokens=spec.max_tokens or 96)
        prompts = {"teacher": self.teacher_system, "student": self.student_system}
        external = self.file_suite(spec)
        if external is not None:
            return _with_prompts(external, prompts)
        from distillgate.data.versions import load_version

        manifest = json.loads((Path(version["version_dir"]) / "manifest.json").read_text())
        version_rows = rows() if rows is not None else load_version(version["version_dir"])
        splits = (spec.split, "golden") if spec.split == "test" else (spec.split,)
        suite = project_suite(version_rows, self.labels, name=p.name, splits=splits, sample=spec.sample, seed=spec.seed,
                              out_of_scope=p.task.out_of_scope_label,
                              golden_ids=manifest.get("golden", {}).get("row_ids", ()),
                              meta={"dataset_version": version["version_id"]})
        return _with_prompts(suite, prompts)

    def file_suite(self, spec: Any) -> Any:
        """A suite read from a labelled file (``path``, or the built-in ``banking77`` test split); else None."""
        from distillgate.evals.suites import load_banking77, load_dataset_items

        if spec.path is not None:
            suite = load_dataset_items(self.project.path(self.base, spec.path), labels=self.labels,
                                       sample=spec.sample, seed=spec.seed,
                                       out_of_scope=self.project.task.out_of_scope_label)
            return replace(suite, name=spec.name)
        if spec.name == "banking77":
            return load_banking77(sample=spec.sample, seed=spec.seed)
        return None

    def student_card(self, version_id: str, gate: dict[str, Any]) -> dict[str, Any]:
        """What a student's run record says of where it came from (``train.export.student_card``)."""
        from distillgate.ledger.store import Store
        from distillgate.train.export import student_card

        with Store.open(self.store_path) as store:
            card = student_card(store, project=self.project.project, run=self.project.run_id,
                                version_id=version_id, decision_index=gate["decision_index"])
        return {**card, "db": str(self.store_path)}

    def stage_eval(self) -> StageOutcome:
        from distillgate.evals.answers import run_source
        from distillgate.evals.lift import recipe_lift
        from distillgate.evals.run import evaluate_pair
        from distillgate.evals.sources import AnswerSource, OpenAIChatSource, student_source

        p = self.project
        train = self.require("train")
        # the version the student was trained on (its test and golden rows are the project suite)
        version = ({"version_id": train["version_id"], "version_dir": train["version_dir"]}
                   if train.get("version_dir") else self.require("freeze"))
        self.gate("promote", version["version_id"])  # the evaluation decides whether the student takes traffic
        target = self.gateway()
        headers = {"X-Policy-User": p.user, "X-Policy-Project": p.project, "X-Policy-Run": p.run_id,
                   "X-Policy-Output-Type": p.task.output_type}
        summaries: dict[str, Any] = {}
        files: dict[str, str] = {}
        probed: tuple[Any, Any] | None = None  # the suite the edge-case probe rewrites, and its spec
        read: list[list[dict[str, Any]]] = []

        def version_rows() -> list[dict[str, Any]]:
            """The frozen version's rows, read from disk once for every suite and the reused teacher answers."""
            if not read:
                from distillgate.data.versions import load_version

                read.append(load_version(version["version_dir"]))
            return read[0]

        for spec in p.eval.suites:
            suite = self.suite(spec, version, version_rows)
            if suite.kind == "classification" and (probed is None or (spec.name == "project" and
                                                                      probed[1].name != "project")):
                probed = (suite, spec)
            key = "project" if spec.name == "project" else spec.name
            scoring = p.generation.label_scoring and suite.kind == "classification"
            teacher: AnswerSource = OpenAIChatSource(
                name=p.teacher.model, base_url=target.base_url, api_key=target.api_key, headers=headers,
                request_logprobs=True, label_choices=list(suite.labels) if scoring else None,
                label_score="mean" if p.generation.label_scoring == "mean" else None)
            if spec.name == "project" and scoring and p.eval.teacher_live_items is not None:
                # the teacher already answered these rows in `generate`, through the gateway, with this request
                from distillgate.evals.reuse import ReusedTeacher, stored_answers

                teacher = ReusedTeacher(teacher, stored_answers(version_rows()),
                                        live_items=p.eval.teacher_live_items)
            student = student_source(train["model_dir"], name=f"student:{p.name}", threads=p.eval.threads)
            out = self.workdir / "eval" / key
            metadata = {"run_id": p.run_id, "dataset_version": version["version_id"],
                        "policy_ids": [f"{pol.policy_id}@{pol.content_hash[:16]}" for pol in self.policies],
                        "checkpoint": self.checkpoint()}
            with self._progress() as progress:
                bars = {role: progress.add_task(f"{key}: {role}", total=len(suite.items), rate="")
                        for role in ("teacher", "student")}

                def on_progress(role: str, done: int, total: int, bars: dict[str, Any] = bars,
                                progress: Progress = progress) -> None:
                    progress.update(bars[role], completed=done)

                try:
                    run = evaluate_pair(suite, teacher, student, out, metadata=metadata, detector=p.eval.detector,
                                        target=p.eval.routing_target, min_routed=p.eval.min_routed,
                                        resamples=p.eval.resamples, seed=spec.seed, progress=on_progress)
                finally:
                    teacher.close()
                    student.close()
            summaries[key] = run.result.headline()
            baseline = train.get("baseline")
            if baseline and suite.kind == "classification":
                other = student_source(baseline["model_dir"], name=f"baseline-{baseline['recipe']}:{p.name}",
                                       threads=p.eval.threads)
                try:
                    answers = run_source(suite, other, "student", mode="score")
                finally:
                    other.close()
                lift = recipe_lift(suite, run.answers, answers, primary=str(train.get("recipe")),
                                   baseline=str(baseline["recipe"]), resamples=p.eval.resamples, seed=spec.seed)
                (out / "recipe_lift.json").write_text(json.dumps(lift, indent=2) + "\n")
                summaries[key]["recipe_lift"] = lift
                files[f"{key}_lift"] = str(out / "recipe_lift.json")
            files[f"{key}_report"] = str(run.report_path)
            files[f"{key}_metrics"] = str(run.metrics_path)
        outputs: dict[str, Any] = {"headline": summaries, "files": files}
        extra = self.synthetic_eval(version, version_rows, train, probed, target, headers)
        outputs.update(extra)
        for key in ("edge_probe_report", "edge_probe_slice"):
            if key in extra.get("edge_probe_files", {}):
                files[key] = extra["edge_probe_files"][key]
        outputs.pop("edge_probe_files", None)
        summary = "; ".join(f"{k}: {_short(v)}" for k, v in summaries.items())
        probe_all = (extra.get("edge_probe") or {}).get("slices", {}).get("all")
        if probe_all:
            summary += f"; edge-case probe ({probe_all['n']} items): " + _short(
                {"teacher_accuracy": probe_all["teacher_accuracy"], "student_accuracy": probe_all["student_accuracy"]})
        return StageOutcome("eval", "ran", 0, summary, outputs)

    def synthetic_eval(self, version: dict[str, Any], version_rows: Callable[[], list[dict[str, Any]]],
                       train: dict[str, Any], probed: tuple[Any, Any] | None, target: Any,
                       headers: dict[str, str]) -> dict[str, Any]:
        """The train fit (real vs synthetic train rows) and the edge-case probe, where enabled
        (``pipeline.synthetic_eval``); the probe's teacher calls go through the gateway like the suites'."""
        from distillgate.evals.answers import run_source
        from distillgate.evals.edge_probe import probe_suite
        from distillgate.evals.run import evaluate_pair
        from distillgate.evals.sources import OpenAIChatSource, student_source
        from distillgate.evals.suites import Item, Suite
        from distillgate.pipeline.synthetic_eval import pick_rows, probe_summary, train_fit

        p = self.project
        rows = version_rows()
        has_synthetic = any(r.get("synthetic") is not None and r.get("split") == "train" for r in rows)
        out: dict[str, Any] = {}
        fit_cfg, probe_cfg = p.eval.train_fit, p.eval.edge_probe
        fit = fit_cfg.enabled if fit_cfg.enabled is not None else has_synthetic
        probe = probed is not None and (probe_cfg.enabled if probe_cfg.enabled is not None else
                                        p.synthesize is not None)
        if not (fit or probe):
            return out
        # one student for both measures (loading it, and quantising an int8 one, is the costly part)
        student = student_source(train["model_dir"], name=f"student:{p.name}", threads=p.eval.threads)
        try:
            if fit:
                scored = pick_rows(rows, fit_cfg.real_sample, fit_cfg.seed)
                suite = Suite("train-fit", "classification", [Item(str(r["row_id"]), str(r["input"]), None)
                                                               for r in scored], list(self.labels),
                              system_prompts={"student": self.student_system})
                predicted = [a.label for a in run_source(suite, student, "student", mode="score")]
                out["train_fit"] = train_fit(rows, scored, predicted, resamples=p.eval.resamples, seed=fit_cfg.seed)
                (self.workdir / "eval").mkdir(parents=True, exist_ok=True)
                (self.workdir / "eval" / "train_fit.json").write_text(json.dumps(out["train_fit"], indent=2) + "\n")
            if probe:
                assert probed is not None
                base_suite, spec = probed
                stored = {str(r["row_id"]): str(r["label"]) for r in rows if r.get("label") not in (None, "")}
                try:
                    suite = probe_suite(base_suite, probe_cfg.transforms, sample=probe_cfg.sample,
                                        seed=probe_cfg.seed,
                                        exclude_texts=[str(r["input"]) for r in rows if r.get("split") == "train"],
                                        fallback_gold=stored if spec.name == "project" else None)
                except UserError as exc:  # an optional measure with nothing to measure: a finding, not a failure
                    out["edge_probe"] = {"skipped": str(exc), "items": 0, "slices": {}}
                    return out
                scoring = p.generation.label_scoring
                teacher = OpenAIChatSource(
                    name=p.teacher.model, base_url=target.base_url, api_key=target.api_key, headers=headers,
                    request_logprobs=True, label_choices=list(suite.labels) if scoring else None,
                    label_score="mean" if scoring == "mean" else None)
                metadata = {"run_id": p.run_id, "dataset_version": version["version_id"],
                            "policy_ids": [f"{pol.policy_id}@{pol.content_hash[:16]}" for pol in self.policies],
                            "checkpoint": self.checkpoint()}
                try:
                    run = evaluate_pair(suite, teacher, student, self.workdir / "eval" / "edge_probe",
                                        metadata=metadata, detector=p.eval.detector, target=p.eval.routing_target,
                                        min_routed=p.eval.min_routed, resamples=p.eval.resamples,
                                        seed=probe_cfg.seed)
                finally:
                    teacher.close()
                out["edge_probe"] = {**probe_summary(json.loads(run.metrics_path.read_text())),
                                     "compared_with": "project" if spec.name == "project" else spec.name}
                # "_slice", not "_metrics": the probe is a finding of the report, not a suite the promotion gates read
                out["edge_probe_files"] = {"edge_probe_report": str(run.report_path),
                                           "edge_probe_slice": str(run.metrics_path)}
        finally:
            student.close()
        return out

    def stage_promote(self) -> StageOutcome:
        from distillgate.evals.promotion import REPORT_FILE, promote
        from distillgate.ledger.store import Store

        p = self.project
        train, evaluated = self.require("train"), self.require("eval")
        metrics = [Path(v) for k, v in sorted(evaluated.get("files", {}).items()) if k.endswith("_metrics")]
        student = Path(train["record"]).parent
        denied: PolicyDenied | None = None
        with Store.open(self.store_path) as store:
            try:
                promote(store, self.policies, student, user=p.user, evals=metrics, project=p.project,
                        run=p.run_id, rules=p.promote.gates)
            except PolicyDenied as exc:
                denied = exc
        report = json.loads((student / REPORT_FILE).read_text(encoding="utf-8"))
        gates = report["gates"]
        table = ", ".join(f"{g['gate']} {g['status']}" for g in gates if g["status"] != "skipped") or "no gate declared"
        outputs: dict[str, Any] = {"deployable": report["deployable"], "reasons": report["reasons"], "gates": gates,
                                   "required": p.promote.required, "files": {"promotion_report": str(student / REPORT_FILE)}}
        if denied is not None:
            outputs["message"] = str(denied)
            return StageOutcome("promote", "ran", 0, f"NOT promoted ({', '.join(denied.reasons)}): {table}", outputs)
        outputs["files"]["promotion_record"] = str(student / "promotion.json")
        return StageOutcome("promote", "ran", 0, f"promoted (signed promotion.json): {table}", outputs)

    def promotion_denied(self) -> PolicyDenied | None:
        """The promote stage's denial when ``promote.required`` makes it fail the run; else None."""
        record = self.records.get("promote")
        outputs = record.outputs if record is not None else {}
        if not self.project.promote.required or outputs.get("deployable", True):
            return None
        return PolicyDenied(f"the student of run {self.project.run_id!r} was not promoted and promote.required is "
                            f"true: {outputs.get('message', '')}", list(outputs.get("reasons") or []),
                            hint="see the promotion gates in report.html; set promote.required: false to keep a "
                                 "failed gate a finding of the report")

    def checkpoint(self) -> dict[str, Any]:
        from distillgate.ledger.store import Store

        with Store.open(self.store_path) as store:
            return store.checkpoint().as_dict()

    def stage_report(self) -> StageOutcome:
        from distillgate.pipeline.report import write_run_report

        html, metrics = write_run_report(self)
        return StageOutcome("report", "ran", 0, f"{html}", {"files": {"report": str(html),
                                                                      "metrics": str(metrics)}})

    def stage_export(self) -> StageOutcome:
        from distillgate.pipeline.bundle import export_bundle

        to = self.project.export.to
        if not to:
            return StageOutcome("export", "skipped", 0, "no export.to in the project file")
        urls = export_bundle(self, to)
        return StageOutcome("export", "ran", 0, f"{len(urls)} files to {to}", {"urls": urls})

    # -- driver ---------------------------------------------------------------------------------------------------
    def require(self, stage: str) -> dict[str, Any]:
        record = self.records.get(stage)
        if record is None:
            path = self.cache.path(stage)
            if not path.exists():
                raise NotFoundError(f"stage {stage!r} has not run yet", hint=f"run with --from {stage} or without --only")
            record = StageRecord(stage, "", orjson.loads(path.read_bytes())["outputs"])
        outputs: dict[str, Any] = record.outputs
        return outputs

    def fingerprints(self) -> Iterator[tuple[str, Callable[[], str]]]:
        p = self.project
        chain: list[str] = []

        def link(name: str, *parts: Any) -> Callable[[], str]:
            def compute() -> str:
                fp = fingerprint(name, *parts, chain[-1] if chain else None)
                chain.append(fp)
                return fp
            return compute

        def first() -> str:
            chain.append(self.fp_generate())
            return chain[-1]

        yield "generate", first
        yield "synthesize", link("synthesize", p.synthesize.model_dump() if p.synthesize is not None else None)
        yield "build", link("build", self.dataset_config())
        yield "freeze", link("freeze")
        yield "train", link("train", {k: v for k, v in p.train.items()}, self.student_system,
                            self.trained_version_id(), p.compare.model_dump() if p.compare is not None else None)
        yield "eval", link("eval", p.eval.model_dump(), self.teacher_system, self.student_system)
        # a sign-off given after a denial (review.required) changes the verdict: it is part of the fingerprint
        yield "promote", link("promote", p.promote.model_dump(), [pol.content_hash for pol in self.policies],
                              self.signoff_indexes())
        yield "report", link("report")
        yield "export", link("export", p.export.model_dump())

    def trained_version_id(self) -> str | None:
        from distillgate.data.versions import HEAD

        head = self.workdir / "dataset" / HEAD
        return head.read_text().strip() if head.exists() else None

    def run(self, *, start: str | None = None, only: str | None = None, force: bool = False) -> list[StageOutcome]:
        for name in (start, only):
            if name is not None and name not in STAGES:
                raise UserError(f"unknown stage {name!r}", hint=f"stages: {', '.join(STAGES)}")
        outcomes: list[StageOutcome] = []
        forced = False
        try:
            for name, compute in self.fingerprints():
                fp = compute()
                if only is not None and name != only:
                    continue
                if start is not None and name == start:
                    forced = True
                cached = None if (force or forced or only is not None) else self.cache.get(name, fp)
                if cached is not None:
                    self.records[name] = cached
                    outcomes.append(StageOutcome(name, "cached", 0.0, "unchanged: skipped", cached.outputs))
                    self.console.print(f"[dim]• {name}: unchanged, skipped[/]")
                    continue
                self.console.print(f"[bold]• {name}[/]")
                began, cpu_began = time.monotonic(), time.process_time()
                outcome = getattr(self, f"stage_{name}")()
                outcome.seconds = time.monotonic() - began
                outcome.cpu_seconds = time.process_time() - cpu_began
                record = StageRecord(name, fp, outcome.outputs)
                self.cache.put(record)
                self.records[name] = record
                outcomes.append(outcome)
                self.console.print(f"  {outcome.summary} [dim]({outcome.seconds:.1f}s, "
                                   f"{outcome.cpu_seconds:.1f} CPU s)[/]")
                forced = True  # what a stage that ran produced may differ: every later stage runs too
        finally:
            self.close()
        return outcomes

    def summary_table(self, outcomes: list[StageOutcome]) -> Table:
        table = Table(title=f"distillgate run {self.project.name} (run {self.project.run_id})")
        table.add_column("stage")
        table.add_column("status")
        table.add_column("time", justify="right")
        table.add_column("CPU", justify="right")
        table.add_column("result")
        for o in outcomes:
            table.add_row(o.name, o.status, f"{o.seconds:.1f}s", f"{o.cpu_seconds:.1f}s", o.summary)
        return table


def _resolve_paths(node: Any, base: Path) -> Any:
    """``path`` and ``*_file`` values are relative to the project file (``pkg:NAME`` and ``gguf_file``, a name
    inside the model folder, stay as written)."""
    if isinstance(node, dict):
        out = {k: _resolve_paths(v, base) for k, v in node.items()}
        for key, value in out.items():
            if (key == "path" or key.endswith("_file")) and key != "gguf_file" and isinstance(value, str) \
                    and not value.startswith("pkg:") and not Path(value).is_absolute():
                out[key] = str((base / value).resolve())
        return out
    if isinstance(node, list):
        return [_resolve_paths(v, base) for v in node]
    return node


def _with_prompts(suite: Any, prompts: dict[str, str]) -> Any:
    return replace(suite, system_prompts=prompts)


def _short(headline: dict[str, Any]) -> str:
    parts = []
    for key, value in headline.items():
        if isinstance(value, dict) and "estimate" in value:
            value = value["estimate"]
        if isinstance(value, float):
            parts.append(f"{key}={value:.3f}")
    return ", ".join(parts[:4])

