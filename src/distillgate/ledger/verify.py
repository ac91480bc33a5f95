"""Verify a decision log: hash chain, entry hashes, Merkle checkpoints and their signatures.

Detects a modified entry (its hash no longer matches), a deleted or inserted entry (index gap or broken chain), a
reordered entry (stored index differs from position, chain broken), a truncated log (a signed head or checkpoint
covers more entries than remain), a forged checkpoint (bad signature or a root that does not match the
entries), an edited column (``kind``, ``ts``, ``run``, ``project``, ``user`` differ from the hashed body) and a
replaced key (the first entry names another key than the one verifying). The report names the first bad index.
Verification needs the log and the public key only.

What the log alone cannot show is a *rollback*: entries after an older checkpoint deleted and that checkpoint made
the head again. Every signature is then genuine. ``witnesses`` (heads remembered outside the store, see
ledger/witness.py) catch it: a log behind a witnessed head, or whose first N entries do not hash to a witnessed
root of size N (a fork), fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from distillgate.canonical import sha256_hex
from distillgate.db import Conn, connect, describe, is_postgres
from distillgate.errors import NotFoundError
from distillgate.ledger.entries import COLUMNS, columns
from distillgate.ledger.merkle import Frontier
from distillgate.ledger.records import GENESIS_HASH, Checkpoint
from distillgate.ledger.signing import verify_json
from distillgate.ledger.witness import Witnessed

_QUOTED = ", ".join(f'"{c}"' for c in COLUMNS)  # "user" is reserved in PostgreSQL


@dataclass
class VerifyReport:
    entries: int = 0
    checkpoints_checked: int = 0
    problems: list[str] = field(default_factory=list)
    first_bad_index: int | None = None
    head: dict[str, Any] | None = None
    witnessed: int = 0  # witnessed heads checked
    witnessed_size: int | None = None  # the largest tree size a witness saw

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, index: int | None, message: str) -> None:
        self.problems.append(message)
        if index is not None and (self.first_bad_index is None or index < self.first_bad_index):
            self.first_bad_index = index

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "checkpoints_checked": self.checkpoints_checked,
                "first_bad_index": self.first_bad_index, "problems": self.problems, "head": self.head,
                "witnessed": self.witnessed, "witnessed_size": self.witnessed_size}


def _check_checkpoint(report: VerifyReport, cp: Checkpoint, roots: dict[int, str], public_key_pem: str,
                      label: str) -> None:
    report.checkpoints_checked += 1
    if not verify_json(public_key_pem, cp.payload(), cp.signature):
        report.fail(cp.tree_size - 1 if cp.tree_size else 0,
                    f"{label} at tree size {cp.tree_size}: signature invalid (forged or wrong key)")
        return
    if cp.tree_size > report.entries:
        report.fail(report.entries, f"{label} covers {cp.tree_size} entries but only {report.entries} remain: "
                                    f"log truncated from index {report.entries}")
        return
    root = roots.get(cp.tree_size)
    if root is not None and root != cp.root_hash:
        report.fail(cp.tree_size - 1, f"{label} at tree size {cp.tree_size}: Merkle root mismatch "
                                      "(entries before it were changed)")


def _check_log_key(report: VerifyReport, first: dict[str, Any], public_key_pem: str) -> None:
    """The first entry names the key that signs the log (entries written before it did name none)."""
    log_key = first.get("log_key")
    if isinstance(log_key, dict) and str(log_key.get("public_key_pem", "")).strip() != public_key_pem.strip():
        report.fail(0, f"entry 0 names signing key {log_key.get('key_id')!r}, not the key verifying the log (the "
                       "key was replaced; verify with the key in entry 0, or restore the original key file)")


def _check_witness(report: VerifyReport, w: Witnessed, roots: dict[int, str], public_key_pem: str) -> None:
    report.witnessed += 1
    report.witnessed_size = max(report.witnessed_size or 0, w.tree_size)
    if not verify_json(public_key_pem, w.payload(), w.signature):
        report.fail(None, f"witness {w.source}: the head of size {w.tree_size} is not signed by this key "
                          "(a forged witness, or a witness of another log)")
        return
    if w.tree_size > report.entries:
        report.fail(report.entries, f"rolled back: a witness ({w.source}) saw a signed head of {w.tree_size} "
                                    f"entries at {w.ts}, but only {report.entries} remain (entries from index "
                                    f"{report.entries} were removed)")
        return
    root = roots.get(w.tree_size)
    if root is not None and root != w.root_hash:
        report.fail(w.tree_size - 1 if w.tree_size else 0,
                    f"forked: the first {w.tree_size} entries do not hash to the root a witness ({w.source}) saw "
                    f"at {w.ts} (entries before index {w.tree_size} were rewritten)")


def _check_columns(report: VerifyReport, idx: int, row: Sequence[Any], parsed: dict[str, Any]) -> None:
    for name, stored, hashed in zip(COLUMNS, row, columns(parsed), strict=True):
        if stored != hashed:
            report.fail(idx, f"entry {idx}: column {name!r} is {stored!r} but the hashed entry says {hashed!r} "
                             "(the column was edited)")


def verify_db(path: str | Path, public_key_pem: str | None = None,
              witnesses: Sequence[Witnessed] = ()) -> VerifyReport:
    """Verify the log in a store file. Without ``public_key_pem`` the key stored in the database is used, which
    proves internal consistency only; pass the operator's public key to rule out a re-signed forgery, and
    ``witnesses`` (ledger/witness.py) to rule out a rollback."""
    conn = _open_read_only(path)
    label = describe(path)
    # one snapshot for the head, the checkpoints and every page of the log, while writers go on appending
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if is_postgres(path) else "BEGIN")
    try:
        if public_key_pem is None:
            row = conn.execute("SELECT value FROM meta WHERE key='public_key'").fetchone()
            if row is None:
                raise NotFoundError(f"{label} has no public key; is it a distillgate store?")
            public_key_pem = _bytes(row[0]).decode()
        cps = [Checkpoint(int(a), str(b), str(c), str(d), str(e)) for a, b, c, d, e in conn.execute(
            "SELECT tree_size, root_hash, ts, key_id, signature FROM checkpoints ORDER BY tree_size").fetchall()]
        head_row = conn.execute("SELECT value FROM meta WHERE key='head'").fetchone()
        head = Checkpoint(**orjson.loads(bytes(head_row[0]))) if head_row else None
        wanted = {cp.tree_size for cp in cps} | ({head.tree_size} if head else set()) \
            | {w.tree_size for w in witnesses}
        report = VerifyReport(head=head.as_dict() if head else None)
        roots: dict[int, str] = {}
        frontier = Frontier()
        prev = GENESIS_HASH
        expected = 0
        for idx, entry_hash, raw, *cols in _rows(conn, f"SELECT idx, entry_hash, body, {_QUOTED} FROM log "
                                                        "WHERE idx >= ? ORDER BY idx LIMIT ?"):
            body = _bytes(raw)
            report.entries += 1
            if idx != expected:
                report.fail(expected, f"index {expected} missing: found {idx} next (entry deleted or inserted)")
            computed = sha256_hex(body)
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = {}
                report.fail(idx, f"entry {idx}: body is not valid JSON")
            if computed != entry_hash:
                report.fail(idx, f"entry {idx}: content does not match its entry_hash (modified)")
            if isinstance(parsed, dict):
                _check_columns(report, idx, cols, parsed)
                if idx == 0:
                    _check_log_key(report, parsed, public_key_pem)
            else:
                parsed = {}
            if parsed.get("index") != idx:
                report.fail(idx, f"entry {idx}: records index {parsed.get('index')} (moved or reordered)")
            if parsed.get("prev_hash") != prev:
                report.fail(idx, f"entry {idx}: prev_hash does not link to entry {idx - 1} "
                                 "(an entry before it was changed, removed, inserted or reordered)")
            prev = entry_hash
            expected = idx + 1
            # the Merkle tree is over what the store claims; roots are compared with signed checkpoints
            frontier.append(entry_hash)
            if frontier.size in wanted:
                roots[frontier.size] = frontier.root()
        for cp in cps:
            _check_checkpoint(report, cp, roots, public_key_pem, "checkpoint")
        if head is None:
            if report.entries:
                report.fail(0, "the signed head is missing")
        else:
            _check_checkpoint(report, head, roots, public_key_pem, "signed head")
            if head.tree_size < report.entries:
                report.fail(head.tree_size, f"entries from index {head.tree_size} are not covered by the signed "
                                            "head (appended outside distillgate)")
        for w in witnesses:
            _check_witness(report, w, roots, public_key_pem)
        return report
    finally:
        conn.close()


def _bytes(value: Any) -> bytes:
    if isinstance(value, str):  # a body edited in as text
        return value.encode()
    return bytes(value)


def _open_read_only(db: str | Path) -> Conn:
    if is_postgres(db):
        return connect(db)
    import sqlite3

    from distillgate.db import SQLITE

    p = Path(db)
    if not p.exists():
        raise NotFoundError(f"no store at {p}", hint="pass --db PATH of an existing distillgate store")
    return Conn(sqlite3.connect(f"file:{p}?mode=ro", uri=True), SQLITE)


def _rows(conn: Conn, sql: str, page: int = 10_000) -> Any:
    """The log in pages of ``page`` rows (``sql`` takes the first index and the page size): memory stays bounded."""
    start = 0
    while True:
        rows = conn.execute(sql, (start, page)).fetchall()
        yield from rows
        if len(rows) < page:
            return
        start = int(rows[-1][0]) + 1
