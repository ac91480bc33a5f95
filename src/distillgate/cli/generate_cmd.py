"""``distillgate dataset generate``: teacher answers for every ingested input, through the policy gateway.

With ``--gateway URL`` (and ``--api-key`` / ``$DISTILLGATE_API_KEY``) it talks to a running gateway. Without it,
it starts one in this process (uvicorn in a thread, on a free loopback port) over ``--db`` and ``--policy`` /
``--upstream`` / ``--gateway-config``, creates a fresh API key for ``--user``, and revokes the key and stops the
gateway at the end. Exit 0 when done, 2 when a denial stopped it (what was generated is kept), 3 when rows failed after retries
(a rerun retries them), 1 on bad input.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import click
import orjson

from distillgate.cli.common import default_db
from distillgate.errors import ConfigError, ConfigIssue, PolicyDenied, UpstreamError, UserError
from distillgate.gateway.inprocess import local_gateway


def _gateway_data(config_path: str | None, policy: str | None, upstreams: tuple[str, ...],
                  db: str | None) -> dict[str, Any]:
    from distillgate.cli.gateway_cmd import gateway_document

    data = gateway_document(config_path, upstreams)
    if policy is not None:
        data["policy"] = policy
    if db is not None or "db" not in data:
        data["db"] = db or default_db()
    if "policy" not in data:
        raise ConfigError("command line", [ConfigIssue(
            "--policy", "no gateway to talk to: neither --gateway URL nor a policy for an in-process gateway",
            "pass --gateway http://HOST:PORT/v1 --api-key KEY, or --policy DIR --upstream NAME=URL [--db PATH]")])
    return data


def _open_target(stack: contextlib.ExitStack, gw_data: dict[str, Any] | None, gateway_url: str | None,
                 api_key: str | None, user: str) -> Any:
    """The gateway the dataset commands talk to: an in-process one over ``gw_data`` (kept open by ``stack``), or the
    running gateway at ``gateway_url`` with ``api_key`` (or ``$DISTILLGATE_API_KEY``)."""
    if gw_data is not None:
        return stack.enter_context(local_gateway(gw_data, user))
    from distillgate.data.generate import GatewayTarget

    key = api_key or os.environ.get("DISTILLGATE_API_KEY")
    if not key:
        raise UserError("no API key for --gateway", hint="pass --api-key or set DISTILLGATE_API_KEY "
                        "(create one with `distillgate keys create --user U --db PATH`)")
    return GatewayTarget(base_url=str(gateway_url), api_key=key)


class _Progress:
    """A rich progress bar on stderr: rows, tokens/s and ETA."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.started = time.monotonic()
        self.tokens = 0
        self.progress = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                                 TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), disable=not enabled, transient=False)
        self.task = self.progress.add_task("generate", total=None, tps="0")
        from distillgate.progress import PlainProgress

        # without a terminal the bar shows nothing: plain lines every 30 s instead
        self.plain = PlainProgress("generate", "rows", Console(stderr=True), 30.0) if enabled else None

    def start(self, total: int, done: int) -> None:
        self.progress.update(self.task, total=total, completed=done)
        if self.plain is not None:
            self.plain.start(total, done)

    def advance(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        tps = self.tokens / max(1e-6, time.monotonic() - self.started)
        self.progress.update(self.task, advance=rows, tps=f"{tps:,.0f}")
        if self.plain is not None:
            self.plain.advance(rows, f"{tps:,.0f} tok/s")


@click.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--traffic", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Ingest this CSV/JSONL/Parquet file first (with --map FIELD=COLUMN).")
@click.option("--map", "maps", multiple=True, metavar="FIELD=COLUMN", help="Column mapping for --traffic.")
@click.option("--template", "template_text", default=None, help="User prompt template, e.g. 'Classify: {input}'.")
@click.option("--template-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File holding the user prompt template (its stem is the template id).")
@click.option("--system", "system_text", default=None, help="System prompt.")
@click.option("--system-file", type=click.Path(dir_okay=False, exists=True), default=None, help="System prompt file.")
@click.option("--template-id", default=None, help="Name recorded on rows. [default: file stem, or 'inline']")
@click.option("--labels-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="JSON list of labels: fills {labels} and asks a label scorer, when there is one.")
@click.option("--model", required=True, help="Teacher model name as the gateway routes it.")
@click.option("-k", "--samples", "k", type=int, default=1, show_default=True, help="Samples per input.")
@click.option("--temperature", type=float, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--max-tokens", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i is asked with seed + i.")
@click.option("--logprobs", is_flag=True, help="Ask for token logprobs.")
@click.option("--top-logprobs", type=int, default=None, help="Alternatives per token (implies --logprobs).")
@click.option("--concurrency", type=int, default=8, show_default=True)
@click.option("--max-attempts", type=int, default=4, show_default=True, help="Tries per request on 5xx/timeouts.")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True, help="Seconds per request.")
@click.option("--user", default=lambda: os.environ.get("DISTILLGATE_USER") or os.environ.get("USER") or "user",
              show_default="$DISTILLGATE_USER or the login name", help="X-Policy-User.")
@click.option("--project", required=True, help="X-Policy-Project.")
@click.option("--run", "run_id", default=None, help="X-Policy-Run (keep it across reruns: quotas count per run). "
              "[default: the last run of this working copy, else <dataset name>-<template sha256[:12]>]")
@click.option("--output-type", required=True, help="X-Policy-Output-Type, e.g. labels.")
@click.option("--gateway", "gateway_url", default=None, help="A running gateway, e.g. http://127.0.0.1:8080/v1.")
@click.option("--api-key", default=None, help="Gateway API key [default: $DISTILLGATE_API_KEY].")
@click.option("--gateway-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="In-process gateway: a gateway.yaml (see docs/gateway.md).")
@click.option("--policy", default=None, help="In-process gateway: policy file or directory.")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=BASE_URL",
              help="In-process gateway: an OpenAI-compatible upstream (repeatable).")
@click.option("--db", default=None, help="In-process gateway: SQLite store [default: $DISTILLGATE_DB or "
              "./distillgate.db].")
@click.option("--regenerate", is_flag=True, help="Discard stored answers that were asked for with other settings "
              "(model, prompt, temperature, max_tokens, seed, labels, ...) and ask again [default: refuse].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def generate(directory: str, traffic: str | None, maps: tuple[str, ...], template_text: str | None,
             template_file: str | None, system_text: str | None, system_file: str | None, template_id: str | None,
             labels_file: str | None, model: str, k: int, temperature: float | None, top_p: float | None,
             max_tokens: int | None, seed: int, logprobs: bool, top_logprobs: int | None, concurrency: int,
             max_attempts: int, timeout_s: float, user: str, project: str, run_id: str | None, output_type: str,
             gateway_url: str | None, api_key: str | None, gateway_config: str | None, policy: str | None,
             upstreams: tuple[str, ...], db: str | None, regenerate: bool, no_progress: bool,
             as_json: bool) -> None:
    """Ask the teacher (through the gateway) for k samples of every input in DIRECTORY still missing one.

    Resumable: a rerun with the same settings generates only what is missing. Exit 2 when a denial (quota: 429
    TOKENS_PER_DAY_EXCEEDED / RECORDS_PER_RUN_EXCEEDED; other: 403) stopped the job; rows stored so far are kept.
    """
    from distillgate.data.generate import PromptTemplate, parse_settings
    from distillgate.data.generate import generate as run_job
    from distillgate.data.store import WorkingCopy

    if (template_text is None) == (template_file is None):
        raise UserError("give exactly one of --template TEXT and --template-file FILE",
                        hint='e.g. --template "Classify this banking message: {input}"')
    if system_text is not None and system_file is not None:
        raise UserError("give at most one of --system and --system-file")
    user_tpl = template_text if template_text is not None else Path(str(template_file)).read_text()
    system = system_text if system_text is not None else (Path(system_file).read_text() if system_file else None)
    tpl_id = template_id or (Path(template_file).stem if template_file else "inline")
    labels = None
    if labels_file:
        loaded = orjson.loads(Path(labels_file).read_bytes())
        if not isinstance(loaded, list) or not all(isinstance(x, str) for x in loaded):
            raise UserError(f"{labels_file} is not a JSON list of strings", hint='e.g. ["card_arrival", ...]')
        labels = loaded
    template = PromptTemplate(id=tpl_id, user=user_tpl, system=system)
    if gateway_url is None and api_key is not None:
        raise UserError("--api-key goes with --gateway URL", hint="drop --api-key to use an in-process gateway")
    gw_data = None if gateway_url else _gateway_data(gateway_config, policy, upstreams, db)

    with WorkingCopy.open(directory) as wc:
        if traffic is not None:
            from distillgate.cli.dataset_cmd import _parse_maps
            from distillgate.data.config import ColumnMapping, IngestConfig
            from distillgate.data.ingest import ingest_file

            base = wc.config.ingest
            columns = ColumnMapping.model_validate({**base.columns.model_dump(), **_parse_maps(maps)})
            result = ingest_file(traffic, IngestConfig.model_validate(
                {"columns": columns, "format": base.format, "task": base.task}))
            new, known = wc.add_inputs(result.rows)
            click.echo(f"ingested {result.source_file}: {new} new input(s), {known} already present", err=True)
        previous = wc.get_meta("generate") or {}
        run = (run_id or (previous.get("settings") or {}).get("run")
               or f"{wc.config.name}-{template.sha256[:12]}")
        settings = parse_settings({
            "model": model, "user": user, "project": project, "run": run, "output_type": output_type, "k": k,
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
            "logprobs": logprobs, "top_logprobs": top_logprobs, "labels": labels, "concurrency": concurrency,
            "max_attempts": max_attempts, "timeout_s": timeout_s}, "command line")
        bar = _Progress(enabled=not no_progress and not as_json)
        with contextlib.ExitStack() as stack:
            target = _open_target(stack, gw_data, gateway_url, api_key, user)
            if gw_data is not None:
                click.echo(f"in-process gateway on {target.base_url} (db {gw_data['db']})", err=True)
            with bar.progress:
                report = run_job(wc, template, settings, target, on_start=bar.start, on_progress=bar.advance,
                                 stale="regenerate" if regenerate else "refuse")
    if as_json:
        click.echo(orjson.dumps({**report.as_dict(), "run": run}, option=orjson.OPT_INDENT_2).decode())
    else:
        if report.discarded:
            click.echo(f"discarded {report.discarded} stale answer(s) generated with other settings", err=True)
        click.echo(f"run {run}: {report.added} row(s) added, {report.already_present} already present, "
                   f"{report.denied} denied, {report.failed} failed, {report.retried} retried, "
                   f"{report.tokens} tokens used, {report.seconds:.1f}s")
        for line in report.failures[:5]:
            click.echo(f"  failed: {line}", err=True)
    if report.stopped:
        kind = "out of quota" if report.quota_stop else "denied by policy"
        raise PolicyDenied(
            f"stopped: {kind} (HTTP {report.stop_status}, {', '.join(report.stopped_by)}): {report.stop_message}; "
            f"the {report.added} row(s) generated before the stop are kept",
            report.stopped_by,
            hint="raise the quota or wait for the next day, then rerun the same command to finish"
            if report.quota_stop else "fix the identity/policy named by the reason codes, then rerun")
    if report.failed:
        raise UpstreamError(f"{report.failed} row(s) failed (first: {report.failures[0]})",
                            hint="rerun the same command to retry them; the rows stored are kept")
