"""Reading a frozen dataset version's rows for training (JSONL or Parquet), and what the run record keeps of them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from distillgate.errors import NotFoundError, UserError
from distillgate.jsonl import iter_objects

REQUIRED = ("row_id", "input", "split")


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a dataset file (``.jsonl``/``.json`` one object per line, or ``.parquet``) as plain dicts.

    Rows whose ``filter_status`` is ``fail`` are dropped here; every row must carry ``row_id``, ``input``, ``split``.
    """
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"rows file {str(p)!r} does not exist", hint="point 'rows' at a JSONL or Parquet file")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(p).to_pylist()
    elif p.suffix in (".jsonl", ".json", ".ndjson"):
        rows = list(iter_objects(p))
    else:
        raise UserError(f"cannot read rows from {p.name!r}", hint="use a .jsonl or .parquet file")
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if row.get(k) in (None, "")]
        if missing:
            raise UserError(f"{p}: row {i} lacks {', '.join(missing)}",
                            hint="rows come from a frozen dataset version; rebuild it with distillgate dataset")
    return [r for r in rows if r.get("filter_status", "pass") != "fail"]




def provenance(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run record keeps about the rows: counts by split, edits, and the policy decisions behind them.

    ``policy_decisions`` lists the decision-log entries that allowed each row's teacher call, as
    ``"<entry_index>:<entry_hash>"`` from the row's provenance stamp (``entry_index``, ``entry_hash``); rows without
    a stamp are counted in ``unstamped`` (``distillgate audit trace`` checks each against the log)."""
    decisions: set[str] = set()
    unstamped = 0
    for row in rows:
        stamp = row.get("stamp")
        if isinstance(stamp, dict) and stamp.get("entry_hash") and stamp.get("entry_index") is not None:
            decisions.add(f"{stamp['entry_index']}:{stamp['entry_hash']}")
        else:
            unstamped += 1
    return {
        "n_rows": len(rows),
        "splits": dict(Counter(str(r.get("split")) for r in rows)),
        "edited": sum(1 for r in rows if r.get("edited")),
        "policy_decisions": sorted(decisions, key=lambda d: int(d.split(":", 1)[0])),
        "unstamped": unstamped,
    }
