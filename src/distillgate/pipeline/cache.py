"""Stage caching by content hash: a stage is skipped when its inputs and configuration are unchanged.

Each stage's record lives at ``<workdir>/stages/<name>.json`` and holds the fingerprint of what went in (config
section, upstream stage fingerprints, input file hashes) and what came out (paths, summary). A rerun after a crash
or an edit recomputes the fingerprint and redoes only the stages whose fingerprint changed, and everything after
them. Records are written atomically only after a stage finished, so a crash mid-stage reruns that stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from distillgate.canonical import hash_json


def fingerprint(*parts: Any) -> str:
    return hash_json(list(parts))


@dataclass(frozen=True)
class StageRecord:
    name: str
    fingerprint: str
    outputs: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "outputs": self.outputs}


class StageCache:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str, fp: str) -> StageRecord | None:
        p = self.path(name)
        if not p.exists():
            return None
        data = orjson.loads(p.read_bytes())
        if data.get("fingerprint") != fp:
            return None
        outputs = data.get("outputs") or {}
        for value in outputs.get("files", {}).values():
            if not Path(value).exists():
                return None
        return StageRecord(name, fp, outputs)

    def put(self, record: StageRecord) -> None:
        p = self.path(record.name)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(record.as_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, p)

    def invalidate(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
