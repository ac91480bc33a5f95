"""A witness of the decision log's signed heads, kept outside the store.

Why: the signed head lives in the database it vouches for. Someone who can write the database can delete every
entry after an older checkpoint and copy that checkpoint back as the head; the result is a shorter log whose
every signature is genuine, so ``audit verify`` alone cannot tell (a rollback). Certificate Transparency's answer
is gossip: parties outside the log remember the tree heads they saw, and a log that is later *behind* a remembered
head, or whose first N entries no longer hash to a remembered root (a fork), is caught.

Here the store appends every signed head it commits (each commit that appends entries, each checkpoint) to a
witness file, one JSON line each (``{"tree_size", "root_hash", "ts", "key_id", "signature"}``, opened ``O_APPEND``; fsynced whenever the commit also
wrote a checkpoint). The default file is ``$DISTILLGATE_WITNESS`` or ``<db>.witness.jsonl``; it protects against a
rollback only when it lives where the database's writer cannot rewrite it (another host, an append-only mount,
object storage with retention). Every ``audit export`` also writes its signed checkpoint into the exported
``checkpoint.json``, which ``audit verify --witness`` reads as well, so each export is a witness held elsewhere.

``read_witness`` reads witnessed heads from witness JSONL files, an export's ``checkpoint.json`` or its
``manifest.json``; ``ledger.verify.verify_db(..., witnesses=...)`` compares a log with them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from distillgate.errors import NotFoundError, UserError

_log = logging.getLogger("distillgate.ledger")
_FIELDS = ("tree_size", "root_hash", "ts", "key_id", "signature")


def default_witness_path(db_path: str | Path) -> Path:
    env = os.environ.get("DISTILLGATE_WITNESS")
    if env:
        return Path(env)
    return Path(str(db_path) + ".witness.jsonl")


class WitnessFile:
    """Appends signed heads to a file. A failed append is logged loudly, never raised: the commit it witnesses is
    already durable, and the caller was (or will be) told so."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise NotFoundError(f"the directory of the witness file {self.path} does not exist",
                                hint="create it, or set $DISTILLGATE_WITNESS / the gateway's `witness` to a file "
                                     "in an existing directory")
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, heads: list[bytes], *, sync: bool) -> None:
        """Append signed heads, each the JSON of ``Checkpoint.as_dict()`` (exactly ``_FIELDS``, in that order: the
        store writes each head's JSON once, for its ``meta`` row and for this file)."""
        if self._fd is None or not heads:
            return
        data = b"\n".join(heads) + b"\n"
        try:
            os.write(self._fd, data)
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            _log.error("could not append to the witness file %s: %s; rollbacks past this commit will not be "
                       "detectable from it", self.path, exc)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class Witnessed:
    """One head seen by a witness, and where it was read."""

    tree_size: int
    root_hash: str
    ts: str
    key_id: str
    signature: str
    source: str

    def payload(self) -> dict[str, Any]:
        return {"tree_size": self.tree_size, "root_hash": self.root_hash, "ts": self.ts, "key_id": self.key_id}


def _record(raw: Any, source: str) -> Witnessed:
    if not isinstance(raw, dict) or any(k not in raw for k in _FIELDS):
        raise UserError(f"{source}: not a signed head (needs {', '.join(_FIELDS)})",
                        hint="pass a witness .jsonl, or an export's checkpoint.json or manifest.json")
    size = raw["tree_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UserError(f"{source}: tree_size must be a non-negative integer, got {size!r}")
    return Witnessed(size, str(raw["root_hash"]), str(raw["ts"]), str(raw["key_id"]), str(raw["signature"]), source)


def read_witness(path: str | Path) -> list[Witnessed]:
    """Signed heads from a witness JSONL file, an export's ``checkpoint.json`` or its ``manifest.json``."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"no witness file {p}", hint="pass the witness .jsonl or an export's checkpoint.json")
    text = p.read_bytes()
    try:
        whole = orjson.loads(text)
    except orjson.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):  # an export's checkpoint.json or manifest.json
        return [_record(whole.get("checkpoint", whole), str(p))]
    out = []
    lines = text.split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if n == len(lines):  # a last line cut short by a crash mid-append: the heads before it stand
                continue
            raise UserError(f"{p}:{n}: not JSON ({exc})", hint="a witness file holds one signed head per line") \
                from exc
        out.append(_record(raw, f"{p}:{n}"))
    return out
