"""``distillgate eval``: run teacher and student on the same items, store every answer, write the report.

    distillgate eval --suite banking77 --sample 200 \\
        --teacher local/smollm2 --teacher-url http://127.0.0.1:8080/v1 --project p --user u --run-id r1 \\
        --student ./students/kd-1 --out runs/r1/eval

``--teacher-url`` makes the teacher an OpenAI-compatible endpoint (the policy gateway); without it ``--teacher``
is a local model (directory, .gguf, or ``smollm2``). The same holds for the student. ``--answers FILE`` skips the
models and recomputes the report from a stored answers file.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from distillgate.errors import UserError
from distillgate.redact import redact_argv, scrub


def _source(name: str, url: str | None, api_key: str | None, headers: dict[str, str], logprobs: bool,
            threads: int, label_choices: list[str] | None = None) -> Any:
    from distillgate.evals.sources import LocalCausalLMSource, OpenAIChatSource, student_source

    if url:
        return OpenAIChatSource(name=name, base_url=url, api_key=api_key, headers=headers,
                                request_logprobs=logprobs, label_choices=label_choices)
    if Path(name).is_dir():  # a trained student directory: served the way its family needs
        return student_source(name, threads=threads)
    return LocalCausalLMSource(name, threads=threads)


def dataset_labels(dataset: Path, labels_file: str | None) -> list[str]:
    """The label set a ``--dataset`` suite offers the models: ``--labels-file`` (a JSON list, or one label a line),
    else the task's allowed labels from the version manifest next to the file (``filters.allowed_labels``), else
    every label of the file, across all its splits (never only the split evaluated: a golden split with few labels
    would offer the models just those)."""
    from distillgate.evals.suites import LABEL_KEYS, read_rows

    if labels_file:
        text = Path(labels_file).read_text(encoding="utf-8")
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(loaded, list) or not loaded or not all(isinstance(x, str) for x in loaded):
            raise UserError(f"{labels_file} holds no label list",
                            hint='write a JSON list ["a", "b"] or one label per line')
        return list(dict.fromkeys(loaded))
    manifest = dataset.parent / "manifest.json"
    if manifest.is_file():
        allowed = (json.loads(manifest.read_text()).get("config", {}).get("filters") or {}).get("allowed_labels")
        if allowed:
            return [str(x) for x in allowed]
    rows = read_rows(dataset)
    key = next((k for k in LABEL_KEYS if rows and k in rows[0]), None)
    return sorted({str(r[key]) for r in rows if key and r.get(key) not in (None, "")})


def _load_suite(suite: str, dataset: str | None, split: str | None, sample: int | None, seed: int,
                answer_format: str, task: str | None, labels_file: str | None = None) -> Any:
    from distillgate.evals.suites import DATASET_TASK, load_banking77, load_dataset_items, load_xstest

    fmt: Any = answer_format
    if dataset:
        return load_dataset_items(Path(dataset), labels=dataset_labels(Path(dataset), labels_file), split=split,
                                  sample=sample, seed=seed, answer_format=fmt, task=task or DATASET_TASK)
    if suite == "banking77":
        return load_banking77(sample=sample, seed=seed, answer_format=fmt)
    if suite == "xstest":
        return load_xstest(sample=sample, seed=seed)
    if suite == "harmful":
        from distillgate.evals.harmful import load_harmful

        return load_harmful(sample=sample, seed=seed)
    raise UserError(f"unknown suite {suite!r}", hint="use banking77, xstest, harmful, or --dataset FILE")


@click.command(name="eval")
@click.option("--suite", type=click.Choice(["banking77", "xstest", "harmful", "dataset"]), default="banking77",
              show_default=True, help="Which items; 'dataset' needs --dataset.")
@click.option("--dataset", type=click.Path(dir_okay=False), help="Dataset-version export (csv/jsonl/parquet).")
@click.option("--split", help="Only rows of this split of --dataset (e.g. test, golden, holdout).")
@click.option("--labels-file", type=click.Path(dir_okay=False, exists=True),
              help="The task's label set for --dataset suites (JSON list or one per line) [default: the version "
              "manifest's allowed labels, else every label of the file].")
@click.option("--dataset-version", help="Dataset version id recorded in the report.")
@click.option("--task", help="First sentence of the classification prompt for --dataset suites.")
@click.option("--sample", type=int, help="Fixed random sample of this many items (same --seed, same items).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--answer-format", type=click.Choice(["label", "json"]), default="label", show_default=True,
              help="Ask for a bare label or a JSON object (then JSON validity is scored).")
@click.option("--teacher", help="Teacher model name (with --teacher-url) or local model path / 'smollm2'.")
@click.option("--teacher-url", help="OpenAI-compatible base URL ending in /v1 (the policy gateway).")
@click.option("--student", help="Student model name (with --student-url) or local model path / 'smollm2'.")
@click.option("--student-url", help="OpenAI-compatible base URL for the student, if it is served.")
@click.option("--student-mode", type=click.Choice(["auto", "generate", "score"]), default="auto",
              show_default=True, help="score: label probabilities (local student, classification); "
              "generate: parse the generated text. auto: score when possible.")
@click.option("--api-key", envvar="DISTILLGATE_API_KEY", help="Bearer key for the URLs [$DISTILLGATE_API_KEY].")
@click.option("--user", "policy_user", help="X-Policy-User sent to the gateway.")
@click.option("--project", "policy_project", help="X-Policy-Project sent to the gateway.")
@click.option("--run-id", help="X-Policy-Run sent to the gateway, recorded in the report.")
@click.option("--output-type", default="evaluation", show_default=True, help="X-Policy-Output-Type.")
@click.option("--logprobs/--no-logprobs", default=False, help="Ask HTTP models for token log-probs.")
@click.option("--label-choices/--free-text", default=False, show_default=True,
              help="Classification suites: the teacher behind --teacher-url chooses among the suite's labels "
              "(distillgate's label_choices, as `distillgate run` asks it) instead of answering in free text.")
@click.option("--policy-id", "policy_ids", multiple=True, help="Policy id(s) in force, for the report.")
@click.option("--checkpoint", help="Decision-log checkpoint (a JSON file or an id) recorded in the report.")
@click.option("--detector", type=click.Choice(["string", "ngram", "embedding"]), default="ngram", show_default=True,
              help="Refusal detector for refusal suites.")
@click.option("--target", type=float, default=0.95, show_default=True,
              help="Routing: student accuracy on routed items >= target x teacher accuracy on them.")
@click.option("--min-routed", type=int, default=10, show_default=True, help="Routing: fewest items routed.")
@click.option("--resamples", type=int, default=2000, show_default=True, help="Bootstrap resamples.")
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads for local models.")
@click.option("--answers", "answers_path", type=click.Path(dir_okay=False),
              help="Recompute from this answers.jsonl instead of running the models.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for answers.jsonl, metrics.json, report.html, threshold.json.")
def cli(**opts: Any) -> None:
    """Run TEACHER and STUDENT on the same items and compare them item by item."""
    run_eval(**opts)


def run_eval(*, suite: str, dataset: str | None, split: str | None, labels_file: str | None,
             dataset_version: str | None, task: str | None,
             sample: int | None, seed: int, answer_format: str, teacher: str | None, teacher_url: str | None,
             student: str | None, student_url: str | None, student_mode: str, api_key: str | None,
             policy_user: str | None, policy_project: str | None, run_id: str | None, output_type: str,
             logprobs: bool, label_choices: bool, policy_ids: tuple[str, ...], checkpoint: str | None, detector: str, target: float,
             min_routed: int, resamples: int, threads: int, answers_path: str | None, out_dir: str) -> None:
    from distillgate.evals.answers import read_answers
    from distillgate.evals.run import collect_answers, score_and_report

    if suite == "dataset" and not dataset:
        raise UserError("--suite dataset needs --dataset FILE", hint="point --dataset at a dataset-version export")
    the_suite = _load_suite(suite, dataset, split, sample, seed, answer_format, task, labels_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset_version": dataset_version, "policy_ids": list(policy_ids), "run_id": run_id,
        "checkpoint": _checkpoint(checkpoint), "detector": detector if the_suite.kind == "refusal" else None,
        # never the API key: the options that carry secrets are masked (distillgate/redact.py)
        "command": "distillgate " + " ".join(redact_argv(sys.argv[1:])) if sys.argv else None,
    }
    metadata = scrub(metadata, [api_key])
    cards: dict[str, dict[str, Any]] = {}
    if answers_path:
        answers = read_answers(Path(answers_path))
        cards = json.loads(Path(answers_path).with_name("cards.json").read_text(encoding="utf-8")) \
            if Path(answers_path).with_name("cards.json").exists() else {}
    else:
        if not teacher or not student:
            raise UserError("--teacher and --student are required unless --answers is given",
                            hint="e.g. --teacher smollm2 --student ./my-student")
        headers = {k: v for k, v in {"X-Policy-User": policy_user, "X-Policy-Project": policy_project,
                                     "X-Policy-Run": run_id, "X-Policy-Output-Type": output_type}.items() if v}
        choices = list(the_suite.labels) if label_choices and the_suite.kind == "classification" else None
        teacher_source = _source(teacher, teacher_url, api_key, headers, logprobs, threads, choices)
        student_source = _source(student, student_url, api_key, headers, logprobs, threads)
        try:
            click.echo(f"teacher: {teacher_source.name}; student: {student_source.name}; "
                       f"{len(the_suite.items)} items", err=True)
            answers, cards = collect_answers(the_suite, teacher_source, student_source, student_mode=student_mode,
                                             progress=_progress)
        finally:
            teacher_source.close()
            student_source.close()
        cards = scrub(cards, [api_key])
        (out / "cards.json").write_text(json.dumps(cards, indent=2, default=str) + "\n", encoding="utf-8")
    run = score_and_report(the_suite, answers, cards, out, metadata=metadata, detector=detector, target=target,
                           min_routed=min_routed, resamples=resamples, seed=seed)
    result = run.result
    click.echo(f"answers: {run.answers_path}\nmetrics: {run.metrics_path}\nreport:  {run.report_path}")
    if result.routing is not None and run.threshold_path is not None:
        chosen = result.routing.chosen
        click.echo(f"routing: {chosen.coverage:.1%} of traffic to the student at threshold {chosen.threshold:.4g}"
                   f" -> {run.threshold_path}")
    for key, value in result.headline().items():
        if isinstance(value, dict) and "estimate" in value:
            value = value["estimate"]
        click.echo(f"  {key}: {value}")


def _checkpoint(value: str | None) -> Any:
    if value and os.path.isfile(value):
        text = Path(value).read_text(encoding="utf-8")
        try:
            return json.loads(text)
        except ValueError:
            return text.strip()
    return value


def _progress(role: str, done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        click.echo(f"  {role}: {done}/{total}", err=True)
