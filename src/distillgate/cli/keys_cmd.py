"""``distillgate keys create/list/revoke``: API keys of the gateway (stored hashed in the --db SQLite file)."""

from __future__ import annotations

import click
import orjson

from distillgate.cli.common import db_option
from distillgate.keys import KeyStore


@click.group("keys")
def cli() -> None:
    """Create, list and revoke gateway API keys."""


@cli.command("create")
@click.option("--user", required=True, help="The user the key belongs to (must equal policy_user on requests).")
@click.option("--label", default=None, help="A note to recognise the key by.")
@db_option
def create(user: str, label: str | None, db: str) -> None:
    """Create a key and print it once (only its hash is stored)."""
    with KeyStore(db) as store:
        record, secret = store.create(user, label=label)
    click.echo(secret)
    click.echo(f"key_id {record.key_id} for user {record.user}: store the key now, it is not shown again",
               err=True)


@cli.command("list")
@click.option("--user", default=None, help="Only this user's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@db_option
def list_keys(user: str | None, as_json: bool, db: str) -> None:
    """List keys (ids, users, creation and revocation times; never secrets)."""
    with KeyStore(db) as store:
        keys = store.list(user=user)
    for k in keys:
        if as_json:
            click.echo(orjson.dumps({"key_id": k.key_id, "user": k.user, "created_at": k.created_at,
                                     "revoked_at": k.revoked_at, "label": k.label}).decode())
        else:
            state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
            click.echo(f"{k.key_id}  {k.user}  created {k.created_at}  {state}" + (f"  {k.label}" if k.label else ""))


@cli.command("revoke")
@click.argument("key_id")
@db_option
def revoke(key_id: str, db: str) -> None:
    """Revoke a key by its id; requests with it are denied (AUTH reason) from now on."""
    with KeyStore(db) as store:
        record = store.revoke(key_id)
    click.echo(f"revoked {record.key_id} of user {record.user} at {record.revoked_at}")
