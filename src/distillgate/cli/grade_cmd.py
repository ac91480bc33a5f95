"""``distillgate dataset grade DIR``: the teacher grades every answer against the dataset's rubric, through the gateway.

The rubric is the working copy's ``rubric`` section (docs/dataset.md "Rubric grading"). The gateway is reached as
by ``dataset generate``: ``--gateway URL`` (with ``--api-key`` / ``$DISTILLGATE_API_KEY``), or one started in this
process over ``--policy`` / ``--upstream`` / ``--db``. Exit 0 when done, 2 when a denial stopped it (the grades so
far are kept), 3 when calls failed (a rerun grades only what is missing), 1 on bad input.
"""

from __future__ import annotations

import contextlib
import os

import click
import orjson

from distillgate.errors import PolicyDenied, UpstreamError, UserError


@click.command("grade")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--model", default=None, help="The grader [default: rubric.model, else the model of the last "
              "generation].")
@click.option("--user", default=lambda: os.environ.get("DISTILLGATE_USER") or os.environ.get("USER") or "user",
              show_default="$DISTILLGATE_USER or the login name", help="X-Policy-User.")
@click.option("--project", required=True, help="X-Policy-Project.")
@click.option("--run", "run_id", default=None, help="X-Policy-Run [default: the run of the last generation].")
@click.option("--regrade", is_flag=True, help="Grade every answer again, not only those without a grade under "
              "the current rubric.")
@click.option("--gateway", "gateway_url", default=None, help="A running gateway, e.g. http://127.0.0.1:8080/v1.")
@click.option("--api-key", default=None, help="Gateway API key [default: $DISTILLGATE_API_KEY].")
@click.option("--gateway-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="In-process gateway: a gateway.yaml (see docs/gateway.md).")
@click.option("--policy", default=None, help="In-process gateway: policy file or directory.")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=BASE_URL",
              help="In-process gateway: an OpenAI-compatible upstream (repeatable).")
@click.option("--db", default=None, help="In-process gateway: SQLite store [default: $DISTILLGATE_DB or "
              "./distillgate.db].")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True, help="Seconds per request.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def grade(directory: str, model: str | None, user: str, project: str, run_id: str | None, regrade: bool,
          gateway_url: str | None, api_key: str | None, gateway_config: str | None, policy: str | None,
          upstreams: tuple[str, ...], db: str | None, timeout_s: float, as_json: bool) -> None:
    """Grade the answers in DIRECTORY against its rubric (output type `rubrics`, governed like generation)."""
    from distillgate.cli.generate_cmd import _gateway_data, _open_target
    from distillgate.data.grade import grade as run_grading
    from distillgate.data.store import WorkingCopy

    if gateway_url is None and api_key is not None:
        raise UserError("--api-key goes with --gateway URL", hint="drop --api-key to use an in-process gateway")
    gw_data = None if gateway_url else _gateway_data(gateway_config, policy, upstreams, db)
    with WorkingCopy.open(directory) as wc:
        rubric = wc.config.rubric
        if rubric is None:
            raise UserError(f"{directory} declares no rubric",
                            hint="add a `rubric:` section (criteria, scale) to its dataset.yaml; see docs/dataset.md")
        settings = (wc.get_meta("generate") or {}).get("settings") or {}
        grader = model or rubric.model or settings.get("model")
        run = run_id or settings.get("run")
        if not grader or not run:
            raise UserError("no grader model or run: nothing was generated in this working copy yet",
                            hint="pass --model and --run")
        with contextlib.ExitStack() as stack:
            target = _open_target(stack, gw_data, gateway_url, api_key, user)
            report = run_grading(wc, rubric, target, model=str(grader), user=user, project=project, run=str(run),
                                 regrade=regrade, timeout_s=timeout_s)
    if as_json:
        click.echo(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(f"rubric {rubric.id!r} by {grader}: {report.graded} graded, {report.unparsed} unparsed, "
                   f"{report.already_graded} already graded, {report.failed} failed, {report.conflicts} edited "
                   f"meanwhile, {report.tokens} tokens")
    if report.stopped_by:
        raise PolicyDenied(f"grading stopped by the gateway ({', '.join(report.stopped_by)}): {report.stop_message}",
                           report.stopped_by, hint="allow the output type `rubrics` (or rubric.output_type) in "
                           "the policy, then rerun: the grades so far are kept")
    if report.failed:
        raise UpstreamError(f"{report.failed} grading call(s) failed (first: {report.failures[0]})",
                            hint="rerun: only the answers without a grade are asked again")
