"""``distillgate stamp verify``: check a provenance stamp's signature, that the answer it came with is unedited, and,
given the log, that its entry exists.

SOURCE may be a saved response body (JSON), a saved SSE stream (the ``data: ...`` lines as received, the stamp in
the last chunk before ``[DONE]``: its choices are assembled as the gateway assembled them, see
``distillgate.gateway.answer``), a stamp JSON file, or an ``X-Distillgate-Stamp`` header value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson

from distillgate.db import is_postgres
from distillgate.errors import IntegrityError, UserError
from distillgate.gateway.answer import answer_digest, assemble_sse, legacy_digest_v1
from distillgate.gateway.stamps import Stamp


@click.group("stamp")
def cli() -> None:
    """Verify provenance stamps of gateway responses."""


def _load(source: str) -> tuple[Stamp, dict[str, Any] | None]:
    """A stamp, and the answer it covers when SOURCE holds one (``{"choices": [...], "model": ...}``)."""
    path = Path(source)
    try:
        is_file = path.is_file()
    except OSError:  # a header value is longer than a file name may be
        is_file = False
    if is_file:
        data = path.read_bytes()
        if data.lstrip().startswith(b"data:"):
            try:
                assembly, stamped = assemble_sse(data.decode("utf-8"))
            except (UnicodeDecodeError, orjson.JSONDecodeError) as exc:
                raise UserError(f"{source} is not a readable SSE stream: {exc}",
                                hint="save the stream's bytes as received (curl -N ... > stream.txt)") from exc
            if stamped is None:
                raise IntegrityError(f"the stream in {source} carries no distillgate stamp",
                                     hint="the stamp travels in the last chunk before [DONE]; save the whole stream")
            return Stamp.from_response(stamped), {"choices": assembly.choices(), "model": assembly.model}
        try:
            doc = orjson.loads(data)
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
    """Verify SOURCE: a saved response body, a saved SSE stream, a stamp JSON file, or an X-Distillgate-Stamp
    header value.

    Exit 0 when valid; exit 2 (IntegrityError) when not.
    """
    stamp, response = _load(source)
    store = None
    if db is not None:
        if not is_postgres(db) and not Path(db).exists():
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
            choices = response.get("choices") or []
            digest = legacy_digest_v1(choices) if stamp.payload.get("v") == 1 else \
                answer_digest(choices, response.get("model"))
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
