"""``distillgate stamp verify``: check a provenance stamp's signature and, given the log, that its entry exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson

from distillgate.errors import IntegrityError, UserError
from distillgate.gateway.stamps import Stamp, response_digest


@click.group("stamp")
def cli() -> None:
    """Verify provenance stamps of gateway responses."""


def _load(source: str) -> tuple[Stamp, dict[str, Any] | None]:
    """A stamp from a response JSON file, a stamp JSON file, or an X-Distillgate-Stamp header value."""
    path = Path(source)
    try:
        is_file = path.is_file()
    except OSError:  # a header value is longer than a file name may be
        is_file = False
    if is_file:
        try:
            doc = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise UserError(f"{source} is not JSON: {exc}", hint="save the response body or the stamp as JSON") from exc
        if isinstance(doc, dict) and isinstance(doc.get("distillgate"), dict) and "stamp" in doc["distillgate"]:
            return Stamp.from_dict(doc["distillgate"]["stamp"]), doc
        if isinstance(doc, dict):
            return Stamp.from_dict(doc), None
        raise UserError(f"{source} holds no stamp", hint="give the response body JSON or the stamp object")
    return Stamp.from_header(source), None


@cli.command("verify")
@click.argument("source")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM public key (`distillgate audit pubkey`); default: the key of --db.")
@click.option("--db", default=None, type=click.Path(dir_okay=False),
              help="The gateway's store: also check that the stamp's log entry exists with the same hash.")
def verify(source: str, public_key: str | None, db: str | None) -> None:
    """Verify SOURCE: a saved response body, a stamp JSON file, or an X-Distillgate-Stamp header value.

    Exit 0 when valid; exit 2 (IntegrityError) when not.
    """
    stamp, response = _load(source)
    store = None
    if db is not None:
        if not Path(db).exists():
            raise UserError(f"no store at {db}", hint="pass the --db the gateway used")
        from distillgate.ledger.store import Store

        store = Store.open(db)
    try:
        if public_key is not None:
            pem: str | bytes = Path(public_key).read_bytes()
        elif store is not None:
            pem = store.signer.public_key_pem()
        else:
            raise UserError("give --public-key PEM or --db PATH to verify against")
        if not stamp.verify(pem):
            raise IntegrityError("the stamp's signature does not verify: it was altered or signed by another key")
        click.echo(f"signature ok (key {stamp.payload['key_id']})")
        if response is not None:
            digest = response_digest(response.get("choices") or [])
            if digest != stamp.payload["response_hash"]:
                raise IntegrityError("the response's choices do not match the stamp's response_hash: it was edited")
            click.echo("response hash ok")
        if store is not None:
            index = int(stamp.payload["entry_index"])
            try:
                entry = store.entry(index)
            except Exception as exc:
                raise IntegrityError(f"log entry {index} does not exist in {db}", index=index) from exc
            if entry.entry_hash != stamp.payload["entry_hash"]:
                raise IntegrityError(f"log entry {index} has another hash than the stamp says", index=index)
            click.echo(f"log entry {index} ok ({entry.body.get('decision')} under {entry.body.get('policy_id')})")
    finally:
        if store is not None:
            store.close()
