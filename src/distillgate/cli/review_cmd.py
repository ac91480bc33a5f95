"""``distillgate review``: queues, next, show, accept, correct, reject (the same functions the web pages call), serve,
and ``user add/list/disable`` (reviewer accounts for the web page)."""

from __future__ import annotations

import getpass
import os
from typing import Any

import click
import orjson

from distillgate.cli.review_serve import serve
from distillgate.cli.review_users import users
from distillgate.data.schema import Row


def _dataset_option(func: Any) -> Any:
    return click.option(
        "--dataset", "dataset", default=lambda: os.environ.get("DISTILLGATE_DATASET", "."),
        show_default="$DISTILLGATE_DATASET or .", type=click.Path(file_okay=False),
        help="Dataset working copy.",
    )(func)


def _reviewer_option(func: Any) -> Any:
    def default() -> str:
        return os.environ.get("DISTILLGATE_REVIEWER") or getpass.getuser()

    return click.option("--reviewer", default=default, show_default="$DISTILLGATE_REVIEWER or your login",
                        help="Who is reviewing (recorded on the row).")(func)


def _version_option(func: Any) -> Any:
    return click.option("--row-version", "row_version", type=int, required=True,
                        help="The row version you reviewed (from `review show`); stale versions are refused.")(func)


def _log_option(func: Any) -> Any:
    """``--db/--project/--run``: when ``--db`` is given, the verdict is also a ``review`` event in the decision log."""
    func = click.option("--run", default=None, help="policy_run_id the dataset belongs to (recorded).")(func)
    func = click.option("--project", default=None, help="policy_project_id the dataset belongs to (recorded).")(func)
    return click.option("--db", default=lambda: os.environ.get("DISTILLGATE_DB"), show_default="$DISTILLGATE_DB",
                        type=click.Path(dir_okay=False),
                        help="Store whose decision log records the review event.")(func)


def _log_verdict(verdict: Any, dataset: str, db: str | None, project: str | None, run: str | None) -> None:
    if not db:
        return
    from distillgate.data.review import log_review
    from distillgate.ledger.store import Store

    with Store.open(db) as store:
        entry = log_review(store, verdict, dataset=os.path.abspath(dataset), project=project, run=run)
    click.echo(f"logged review event at decision-log index {entry.index}")


def _render(row: Row, as_json: bool) -> str:
    if as_json:
        return orjson.dumps(row.to_record(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    lines = [
        f"row {row.row_id} (version {row.version})  split={row.split}  filter={row.filter_status} "
        f"{','.join(row.filter_reasons)}",
        f"review: {row.review_state}" + (f" by {row.reviewer}: {row.review_reason}" if row.reviewer else ""),
        f"input:   {row.input}",
        f"output:  {row.output}",
        f"label:   {row.label}  (teacher: {row.teacher_label}; edited: {row.edited})",
    ]
    if row.label_probs:
        top = sorted(row.label_probs.items(), key=lambda kv: -kv[1])[:3]
        lines.append("probs:   " + ", ".join(f"{k}={v:.2f}" for k, v in top))
    if row.agreement is not None:
        lines.append(f"samples agree: {row.agreement:.2f}")
    return "\n".join(lines)


@click.group()
def cli() -> None:
    """Review rows from slice queues; corrections keep the teacher's answer and mark the row edited."""


@cli.command("queues")
@_dataset_option
@click.option("--all", "include_done", is_flag=True, help="Count reviewed rows too.")
def queues_cmd(dataset: str, include_done: bool) -> None:
    """List review queues and how many rows wait in each."""
    from distillgate.data.review import queue_sizes
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(dataset) as wc:
        sizes = queue_sizes(wc, include_done=include_done)
    if not sizes:
        click.echo("no rows waiting for review")
    for name, n in sorted(sizes.items()):
        click.echo(f"{n:6d}  {name}")


@cli.command("next")
@click.argument("queue")
@_dataset_option
@_reviewer_option
@click.option("--json", "as_json", is_flag=True)
def next_cmd(queue: str, dataset: str, reviewer: str, as_json: bool) -> None:
    """Show the next unreviewed row of QUEUE."""
    from distillgate.data.review import next_row
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(dataset) as wc:
        row = next_row(wc, queue, reviewer)
    click.echo(_render(row, as_json) if row else f"queue {queue!r} is empty")


@cli.command("show")
@click.argument("row_id")
@_dataset_option
@click.option("--json", "as_json", is_flag=True)
def show_cmd(row_id: str, dataset: str, as_json: bool) -> None:
    """Show one row with its version, verdicts and review trail."""
    from distillgate.data.review import show
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(dataset) as wc:
        click.echo(_render(show(wc, row_id), as_json))


@cli.command("accept")
@click.argument("row_id")
@_dataset_option
@_reviewer_option
@_version_option
@_log_option
@click.option("--reason", default=None)
def accept_cmd(row_id: str, dataset: str, reviewer: str, row_version: int, reason: str | None, db: str | None,
               project: str | None, run: str | None) -> None:
    """Keep the teacher's label."""
    from distillgate.data.review import accept
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(dataset) as wc:
        verdict = accept(wc, row_id, reviewer, row_version, reason)
    click.echo(f"accepted {row_id} (now version {verdict.row.version})")
    _log_verdict(verdict, dataset, db, project, run)


@cli.command("correct")
@click.argument("row_id")
@_dataset_option
@_reviewer_option
@_version_option
@click.option("--label", required=True, help="The correct label.")
@click.option("--reason", required=True, help="Why the teacher was wrong.")
@_log_option
def correct_cmd(row_id: str, dataset: str, reviewer: str, row_version: int, label: str, reason: str,
                db: str | None, project: str | None, run: str | None) -> None:
    """Store a human label (the teacher's answer is kept; the row is marked edited)."""
    from distillgate.data.review import correct
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(dataset) as wc:
        verdict = correct(wc, row_id, reviewer, row_version, label, reason)
    click.echo(f"corrected {row_id}: label {verdict.row.teacher_label!r} -> {verdict.row.label!r} "
               f"(now version {verdict.row.version})")
    _log_verdict(verdict, dataset, db, project, run)


@cli.command("reject")
@click.argument("row_id")
@_dataset_option
@_reviewer_option
@_version_option
@click.option("--reason", required=True)
@_log_option
def reject_cmd(row_id: str, dataset: str, reviewer: str, row_version: int, reason: str, db: str | None,
               project: str | None, run: str | None) -> None:
    """Drop the row from every split."""
    from distillgate.data.review import reject
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(dataset) as wc:
        verdict = reject(wc, row_id, reviewer, row_version, reason)
    click.echo(f"rejected {row_id} (now version {verdict.row.version})")
    _log_verdict(verdict, dataset, db, project, run)


cli.add_command(serve)
cli.add_command(users)
