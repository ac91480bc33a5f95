"""Verify a decision log: hash chain, entry hashes, Merkle checkpoints and their signatures.

Detects a modified entry (its hash no longer matches), a deleted or inserted entry (index gap or broken chain), a
reordered entry (stored index differs from position, chain broken), a truncated log (a signed head or checkpoint
covers more entries than remain) and a forged checkpoint (bad signature or a root that does not match the
entries). The report names the first bad index. Verification needs the log and the public key only.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from distillgate.canonical import sha256_hex
from distillgate.errors import NotFoundError
from distillgate.ledger.merkle import Frontier
from distillgate.ledger.signing import verify_json
from distillgate.ledger.store import GENESIS_HASH, Checkpoint


@dataclass
class VerifyReport:
    entries: int = 0
    checkpoints_checked: int = 0
    problems: list[str] = field(default_factory=list)
    first_bad_index: int | None = None
    head: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, index: int | None, message: str) -> None:
        self.problems.append(message)
        if index is not None and (self.first_bad_index is None or index < self.first_bad_index):
            self.first_bad_index = index

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "checkpoints_checked": self.checkpoints_checked,
                "first_bad_index": self.first_bad_index, "problems": self.problems, "head": self.head}


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


def verify_db(path: str | Path, public_key_pem: str | None = None) -> VerifyReport:
    """Verify the log in a store file. Without ``public_key_pem`` the key stored in the database is used, which
    proves internal consistency only; pass the operator's public key to rule out a re-signed forgery."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"no store at {p}", hint="pass --db PATH of an existing distillgate store")
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        if public_key_pem is None:
            row = conn.execute("SELECT value FROM meta WHERE key='public_key'").fetchone()
            if row is None:
                raise NotFoundError(f"{p} has no public key; is it a distillgate store?")
            public_key_pem = row[0].decode() if isinstance(row[0], bytes) else str(row[0])
        cps = [Checkpoint(int(a), str(b), str(c), str(d), str(e)) for a, b, c, d, e in conn.execute(
            "SELECT tree_size, root_hash, ts, key_id, signature FROM checkpoints ORDER BY tree_size")]
        head_row = conn.execute("SELECT value FROM meta WHERE key='head'").fetchone()
        head = Checkpoint(**orjson.loads(head_row[0])) if head_row else None
        wanted = {cp.tree_size for cp in cps} | ({head.tree_size} if head else set())
        report = VerifyReport(head=head.as_dict() if head else None)
        roots: dict[int, str] = {}
        frontier = Frontier()
        prev = GENESIS_HASH
        expected = 0
        for idx, entry_hash, body in conn.execute("SELECT idx, entry_hash, body FROM log ORDER BY idx"):
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
        return report
    finally:
        conn.close()
