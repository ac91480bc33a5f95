"""``distillgate review``: queues, next, show, accept, correct, reject, sign-off (the same functions the web pages
call), serve, and ``user add/list/disable`` (reviewer accounts for the web page).

Writes prove who the reviewer is exactly as the page does: an API key (``--api-key`` / ``$DISTILLGATE_API_KEY``)
or a reviewer account (``--user`` and its password from ``$DISTILLGATE_REVIEWER_PASSWORD`` or a prompt). The
reviewer is then judged by the policy through ``distillgate.web.site.Access``, the page's own code path; every
refusal is logged with its reason codes and exits 2."""

from __future__ import annotations

import contextlib
import getpass
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import orjson

from distillgate.cli.common import db_option
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


def _auth_options(func: Any) -> Any:
    """Who reviews (proved by a key or an account), for which project and run, judged by which policy."""
    func = click.option("--user", "account", default=lambda: os.environ.get("DISTILLGATE_REVIEWER"),
                        show_default="$DISTILLGATE_REVIEWER",
                        help="Reviewer account (password from $DISTILLGATE_REVIEWER_PASSWORD or a prompt).")(func)
    func = click.option("--api-key", "api_key", default=lambda: os.environ.get("DISTILLGATE_API_KEY"),
                        show_default="$DISTILLGATE_API_KEY", help="The reviewer's API key.")(func)
    func = click.option("--requester", default=None,
                        help="Who started the run [default: the user of its first teacher call in the log].")(func)
    func = click.option("--run", default=None, help="policy_run_id the dataset belongs to [default: the dataset "
                        "directory name].")(func)
    func = click.option("--project", required=True, help="policy_project_id the dataset belongs to.")(func)
    func = click.option("--policy", "policy_path", required=True, type=click.Path(exists=True),
                        help="Policy file or directory (review.reviewers says who may review).")(func)
    return db_option(func)


class Reviewer:
    """A reviewer signed in for one command: who, how, and the open decision log."""

    def __init__(self, user: str, method: str, credential_id: str | None, store: Any, scope: Any) -> None:
        self.user, self.method, self.credential_id, self.store, self.scope = user, method, credential_id, store, scope


@contextlib.contextmanager
def _signed_in(dataset: str, db: str, policy_path: str, project: str, run: str | None, requester: str | None,
               api_key: str | None, account: str | None) -> Iterator[Reviewer]:
    from distillgate.errors import PolicyDenied, UserError
    from distillgate.keys import KeyStore
    from distillgate.ledger.store import Store
    from distillgate.policy.model import load_policies
    from distillgate.web.accounts import AccountStore
    from distillgate.web.site import Access, ReviewScope

    scope = ReviewScope(load_policies(policy_path), project, run or Path(dataset).resolve().name, requester)
    with Store.open(db) as store:
        keys, accounts = KeyStore(db), AccountStore(db)
        try:
            access = Access(scope, keys, accounts, store)
            if api_key:
                result = access.sign_in(api_key)
            elif account:
                password = os.environ.get("DISTILLGATE_REVIEWER_PASSWORD") or click.prompt(
                    f"password for {account}", hide_input=True, err=True)
                result = access.sign_in_password(account, password)
            else:
                raise UserError("a review needs the reviewer's proof of identity",
                                hint="pass --api-key KEY (or $DISTILLGATE_API_KEY), or --user NAME with "
                                     "$DISTILLGATE_REVIEWER_PASSWORD")
            if result.problem is not None or result.user is None:
                raise PolicyDenied(f"review refused: {result.problem}", list(result.reasons),
                                   hint="sign in as a reviewer the policy lists for the project (review.reviewers), "
                                        "not the run's requester, with an active key or account")
        finally:
            keys.close()
            accounts.close()
        yield Reviewer(result.user, result.method, result.credential if result.method == "api_key" else None,
                       store, scope)


def _log_verdict(verdict: Any, dataset: str, who: Reviewer) -> None:
    from distillgate.data.review import log_review

    entry = log_review(who.store, verdict, dataset=os.path.abspath(dataset), project=who.scope.project,
                       run=who.scope.run_id)
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
@_version_option
@_auth_options
@click.option("--reason", default=None)
def accept_cmd(row_id: str, dataset: str, row_version: int, reason: str | None, **auth: Any) -> None:
    """Keep the teacher's label."""
    from distillgate.data.review import accept
    from distillgate.data.store import WorkingCopy

    with _signed_in(dataset, **auth) as who, WorkingCopy.open(dataset) as wc:
        verdict = accept(wc, row_id, who.user, row_version, reason)
        click.echo(f"accepted {row_id} (now version {verdict.row.version})")
        _log_verdict(verdict, dataset, who)


@cli.command("correct")
@click.argument("row_id")
@_dataset_option
@_version_option
@click.option("--label", required=True, help="The correct label.")
@click.option("--reason", required=True, help="Why the teacher was wrong.")
@_auth_options
def correct_cmd(row_id: str, dataset: str, row_version: int, label: str, reason: str, **auth: Any) -> None:
    """Store a human label (the teacher's answer is kept; the row is marked edited)."""
    from distillgate.data.review import correct
    from distillgate.data.store import WorkingCopy

    with _signed_in(dataset, **auth) as who, WorkingCopy.open(dataset) as wc:
        verdict = correct(wc, row_id, who.user, row_version, label, reason)
        click.echo(f"corrected {row_id}: label {verdict.row.teacher_label!r} -> {verdict.row.label!r} "
                   f"(now version {verdict.row.version})")
        _log_verdict(verdict, dataset, who)


@cli.command("reject")
@click.argument("row_id")
@_dataset_option
@_version_option
@click.option("--reason", required=True)
@_auth_options
def reject_cmd(row_id: str, dataset: str, row_version: int, reason: str, **auth: Any) -> None:
    """Drop the row from every split."""
    from distillgate.data.review import reject
    from distillgate.data.store import WorkingCopy

    with _signed_in(dataset, **auth) as who, WorkingCopy.open(dataset) as wc:
        verdict = reject(wc, row_id, who.user, row_version, reason)
        click.echo(f"rejected {row_id} (now version {verdict.row.version})")
        _log_verdict(verdict, dataset, who)


@cli.command("sign-off")
@_dataset_option
@_auth_options
def sign_off_cmd(dataset: str, **auth: Any) -> None:
    """Sign off the dataset for its run: a signed decision-log entry naming you, the version and what was reviewed
    (the working copy is frozen first when it changed since HEAD)."""
    from distillgate.data.signoff import sign_off
    from distillgate.data.store import WorkingCopy

    with _signed_in(dataset, **auth) as who, WorkingCopy.open(dataset) as wc:
        entry, version = sign_off(who.store, who.scope.policy, wc, reviewer=who.user, method=who.method,
                                  credential_id=who.credential_id, project=who.scope.project, run=who.scope.run_id)
    click.echo(f"signed off version {version.version_id[:16]} of run {who.scope.run_id!r} as {who.user} "
               f"(decision-log entry {entry.index})")


cli.add_command(serve)
cli.add_command(users)
