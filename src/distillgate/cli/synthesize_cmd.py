"""``distillgate dataset synthesize``: synthetic inputs written by the teacher through the gateway, then labelled.

The generator calls use output type ``synthetic_records`` (``--plan`` may name another); the labelling calls are the
working copy's own labelling job (``--template`` / ``--labels-file`` / ``--model`` / ``--output-type``, as given to
``dataset generate``), a separate governed call per row. Gateway options are those of ``dataset generate``.
Exit 0 when done, 2 when a denial stopped it (what was written is kept), 3 when calls failed after retries, 1 on bad
input (including a plan beyond ``synthetic.max_train_share``: refused before any call).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import click
import orjson
import yaml

from distillgate.errors import PolicyDenied, UpstreamError, UserError


@click.command("synthesize")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="YAML: what to synthesize (hard_negatives, edge_cases, out_of_scope, adversarial, balance, ...).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a plan key (a.b=value).")
@click.option("--template", "template_text", default=None, help="The labelling prompt template (as for generate).")
@click.option("--template-file", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--system", "system_text", default=None, help="The labelling system prompt.")
@click.option("--template-id", default=None, help="Labelling template id [default: file stem, or 'inline'].")
@click.option("--labels-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="JSON list of the task's labels (balancing targets them; {labels} in prompts).")
@click.option("--model", default=None, help="The labelling teacher model [default: the last generate's].")
@click.option("--output-type", default="labels", show_default=True, help="Output type of the labelling calls.")
@click.option("--max-tokens", type=int, default=None, help="Labelling answer length.")
@click.option("--user", default=lambda: os.environ.get("DISTILLGATE_USER") or os.environ.get("USER") or "user",
              show_default="$DISTILLGATE_USER or the login name")
@click.option("--project", default=None, help="X-Policy-Project [default: the last generate's].")
@click.option("--run", "run_id", default=None, help="X-Policy-Run [default: the last generate's].")
@click.option("--gateway", "gateway_url", default=None, help="A running gateway, e.g. http://127.0.0.1:8080/v1.")
@click.option("--api-key", default=None, help="Gateway API key [default: $DISTILLGATE_API_KEY].")
@click.option("--gateway-config", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--policy", default=None, help="In-process gateway: policy file or directory.")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=BASE_URL")
@click.option("--db", default=None, help="In-process gateway: SQLite store.")
@click.option("--discard", "discard", multiple=True, metavar="KIND",
              help="Delete the synthetic inputs (and rows) of KIND ('all': every kind) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def synthesize(directory: str, plan_file: str | None, overrides: tuple[str, ...], template_text: str | None,
               template_file: str | None, system_text: str | None, template_id: str | None,
               labels_file: str | None, model: str | None, output_type: str, max_tokens: int | None, user: str,
               project: str | None, run_id: str | None, gateway_url: str | None, api_key: str | None,
               gateway_config: str | None, policy: str | None, upstreams: tuple[str, ...], db: str | None,
               discard: tuple[str, ...], as_json: bool) -> None:
    """Write hard negatives, edge cases, out-of-scope, adversarial and balancing inputs from DIRECTORY's train rows.

    Every synthetic row records its kind, generator template, seed rows and the generator call's stamp; the
    teacher then labels it like any input. Resumable: a rerun asks only for what is missing.
    """
    from distillgate.cli.generate_cmd import _gateway_data, _open_target
    from distillgate.data.generate import PromptTemplate, parse_settings
    from distillgate.data.store import WorkingCopy
    from distillgate.data.synthesize import discard_synthetic, parse_synthesize_config
    from distillgate.data.synthesize import synthesize as run_job
    from distillgate.overrides import apply_overrides

    if discard:
        with WorkingCopy.open(directory) as wc:
            n = discard_synthetic(wc, None if "all" in discard else list(discard))
        click.echo(f"discarded {n} synthetic input(s) and their rows; run `distillgate dataset build` again")
        return
    doc: Any = yaml.safe_load(Path(plan_file).read_text()) if plan_file else {}
    cfg = parse_synthesize_config(apply_overrides(doc or {}, list(overrides)), plan_file or "--set")
    if (template_text is None) == (template_file is None):
        raise UserError("give exactly one of --template TEXT and --template-file FILE (the labelling prompt)",
                        hint="the same template `distillgate dataset generate` labelled the real rows with")
    user_tpl = template_text if template_text is not None else Path(str(template_file)).read_text()
    template = PromptTemplate(id=template_id or (Path(template_file).stem if template_file else "inline"),
                              user=user_tpl, system=system_text)
    labels = orjson.loads(Path(labels_file).read_bytes()) if labels_file else None
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise UserError(f"{labels_file} is not a JSON list of strings", hint='e.g. ["card_arrival", ...]')
    gw_data = None if gateway_url else _gateway_data(gateway_config, policy, upstreams, db)
    with WorkingCopy.open(directory) as wc:
        previous = (wc.get_meta("generate") or {}).get("settings") or {}
        missing = [name for name, value in (("--model", model or previous.get("model")),
                                            ("--project", project or previous.get("project"))) if not value]
        if missing:
            raise UserError(f"{' and '.join(missing)} needed: this working copy was never generated for",
                            hint="pass them, or run `distillgate dataset generate` first")
        settings = parse_settings({
            "model": model or previous["model"], "user": user, "project": project or previous["project"],
            "run": run_id or previous.get("run") or f"{wc.config.name}-synthetic", "output_type": output_type,
            "labels": labels, "max_tokens": max_tokens}, "command line")
        with contextlib.ExitStack() as stack:
            target = _open_target(stack, gw_data, gateway_url, api_key, user)
            report = run_job(wc, cfg, label_template=template, label_settings=settings, target=target)
    if as_json:
        click.echo(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        planned = ", ".join(f"{k}={v}" for k, v in report.planned.items()) or "nothing"
        added = ", ".join(f"{k}={v}" for k, v in report.added.items()) or "none"
        click.echo(f"{report.seeds} seed row(s); planned {planned}; added {added}; {report.already_present} "
                   f"already present, {report.empty} empty answer(s), {report.failed} failed, {report.tokens} "
                   f"generator tokens; labelled {report.labelled.get('added', 0)} row(s)")
        for note in report.notes:
            click.echo(f"  note: {note}", err=True)
    if report.stopped:
        raise PolicyDenied(f"stopped by the gateway (HTTP {report.stop_status}): {report.stop_message}; what was "
                           "written before the stop is kept", report.stopped_by,
                           hint="fix the policy or quota named by the reason codes, then rerun")
    if report.failed or report.labelled.get("failed"):
        raise UpstreamError(f"{report.failed} generator call(s) and {report.labelled.get('failed', 0)} labelling "
                            "call(s) failed", hint="rerun the same command: only what is missing is asked for")
