"""JSON-lines files: one object per line, blank lines skipped, a bad line named by file and line number."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from distillgate.errors import UserError

_HINT = "write one JSON object per line"


def iter_objects(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines file, in order (streamed: the file is not read whole)."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc})", hint=_HINT) from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}", hint=_HINT)
            yield record
