"""``distillgate review user add/list/disable/enable/passwd``: reviewer accounts with passwords for the review page.

Passwords are read with ``getpass`` (asked twice) or, for scripts, from the first line of standard input with
``--password-stdin``; there is deliberately no ``--password`` flag (it would land in shell history and ``ps``).
"""

from __future__ import annotations

import getpass
import sys

import click
import orjson

from distillgate.cli.common import db_option
from distillgate.errors import UserError


@click.group("user")
def users() -> None:
    """Reviewer accounts (user name + password) for `review serve`; stored scrypt-hashed in --db."""


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise UserError("--password-stdin got nothing on standard input", hint="pipe the password in: "
                            "`printf '%s\\n' \"$PW\" | distillgate review user add --user NAME --password-stdin`")
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat the password: ") != first:
        raise UserError("the two passwords differ", hint="run the command again and type the same password twice")
    return first


@users.command("add")
@click.option("--user", required=True, help="The reviewer's name (what the policy's review.reviewers lists).")
@click.option("--password-stdin", "password_stdin", is_flag=True,
              help="Read the password from the first line of stdin instead of asking (for scripts).")
@db_option
def add(user: str, password_stdin: bool, db: str) -> None:
    """Create a reviewer account; the password is asked for (at least 12 characters)."""
    from distillgate.web.accounts import AccountStore, check_new_password, check_user_name

    check_user_name(user)
    password = _read_password(password_stdin)
    check_new_password(user, password)
    with AccountStore(db) as store:
        record = store.add(user, password)
    click.echo(f"added reviewer account {record.user}; the policy's review.reviewers decides what it may review")


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@db_option
def list_users(as_json: bool, db: str) -> None:
    """List reviewer accounts (names, creation and disabling times; never passwords)."""
    from distillgate.web.accounts import AccountStore

    with AccountStore(db) as store:
        accounts = store.list()
    if not accounts and not as_json:
        click.echo("no reviewer accounts")
    for a in accounts:
        if as_json:
            record = {"user": a.user, "created_at": a.created_at, "disabled_at": a.disabled_at}
            click.echo(orjson.dumps(record).decode())
        else:
            click.echo(f"{a.user}  created {a.created_at}  " + (f"disabled {a.disabled_at}" if a.disabled_at
                                                                  else "active"))


@users.command("disable")
@click.option("--user", required=True, help="The account to disable.")
@db_option
def disable(user: str, db: str) -> None:
    """Disable an account: no more sign-ins, and its open sessions end at their next request."""
    from distillgate.web.accounts import AccountStore

    with AccountStore(db) as store:
        record = store.disable(user)
    click.echo(f"disabled reviewer account {record.user} at {record.disabled_at}")


@users.command("enable")
@click.option("--user", required=True, help="The disabled account to enable again.")
@db_option
def enable(user: str, db: str) -> None:
    """Enable a disabled account again (its password is unchanged; `passwd` sets a new one)."""
    from distillgate.web.accounts import AccountStore

    with AccountStore(db) as store:
        record = store.enable(user)
    click.echo(f"enabled reviewer account {record.user}")


@users.command("passwd")
@click.option("--user", required=True, help="The account whose password to change.")
@click.option("--password-stdin", "password_stdin", is_flag=True,
              help="Read the new password from the first line of stdin instead of asking (for scripts).")
@db_option
def passwd(user: str, password_stdin: bool, db: str) -> None:
    """Set a new password (asked for twice): the account's open sessions end and a sign-in lockout is lifted."""
    from distillgate.web.accounts import AccountStore, check_new_password, no_account

    with AccountStore(db) as store:
        if store.get(user) is None:  # say so before asking for a password
            raise no_account(user)
        password = _read_password(password_stdin)
        check_new_password(user, password)
        record = store.set_password(user, password)
    click.echo(f"changed the password of reviewer account {record.user}; its open sessions end at their next "
               "request" + ("" if record.active else " (the account is disabled: `review user enable` to use it)"))
