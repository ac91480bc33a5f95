"""The dataset guard: training must never see golden, test or held-out rows.

Training code calls ``ensure_trainable(rows)`` on every row it is about to use. A row is a mapping with at least
``row_id`` and ``split``; rows whose ``split`` is not a training split, or whose ``row_id`` is in a golden set's
hash-locked id list, are refused with ``DatasetGuardError`` naming how many and which.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from distillgate.errors import DatasetGuardError

TRAINABLE_SPLITS = frozenset({"train", "val"})
PROTECTED_SPLITS = frozenset({"test", "golden", "holdout"})


def ensure_trainable(rows: Iterable[Mapping[str, Any]], *, golden_ids: Collection[str] = ()) -> int:
    """Raise ``DatasetGuardError`` if any row may not be trained on; return the number of rows checked."""
    golden = set(golden_ids)
    refused: list[str] = []
    count = 0
    for row in rows:
        count += 1
        split = row.get("split")
        row_id = str(row.get("row_id", f"#{count - 1}"))
        if split not in TRAINABLE_SPLITS or row_id in golden:
            refused.append(f"{row_id} (split={split!r})")
    if refused:
        shown = ", ".join(refused[:5]) + (" …" if len(refused) > 5 else "")
        raise DatasetGuardError(
            f"refusing to train on {len(refused)} protected row(s): {shown}",
            hint="train only on the 'train'/'val' splits of a frozen dataset version; golden, test and holdout "
            "rows are for evaluation",
        )
    return count
