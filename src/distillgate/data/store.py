"""The dataset working copy: a directory holding the config, a SQLite store of inputs and rows, and frozen versions.

    <dir>/dataset.yaml      the dataset config (see ``distillgate.data.config``)
    <dir>/working.sqlite    inputs + rows (one JSON body per row, with indexed split/status/review columns)
    <dir>/versions/<id>/    frozen, content-addressed versions (``distillgate.data.versions``)
    <dir>/HEAD              id of the latest frozen version

The working copy is mutable (builds, reviews, generation append to it); each row carries a ``version`` counter and
every write names the version it read (optimistic concurrency), so a reviewer never overwrites a change they did
not see. Frozen versions are immutable Parquet.

Generation (``distillgate dataset generate``, wired in with the gateway) uses two calls:
``pending_generation(k)`` lists the (input, sample index) pairs still to generate, and
``append_generated(samples)`` stores finished samples exactly once (a rerun that re-sends a stored sample is a no-op).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from distillgate.data.config import DatasetConfig, parse_config
from distillgate.data.schema import FIELD_NAMES, Row, make_row_id
from distillgate.errors import ConflictError, NotFoundError, UserError

CONFIG_FILE = "dataset.yaml"
DB_FILE = "working.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (input_id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    row_id TEXT PRIMARY KEY,
    input_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    split TEXT,
    filter_status TEXT NOT NULL,
    review_state TEXT NOT NULL,
    label TEXT,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS rows_input ON rows(input_id);
CREATE INDEX IF NOT EXISTS rows_review ON rows(review_state, filter_status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


@dataclass(frozen=True)
class GeneratedSample:
    """One teacher answer produced by the generation job, ready to store.

    ``stamp`` is the gateway's signed provenance stamp for the response (stored as given); ``teacher_card`` is the
    teacher card dict (model_id, backend, file_sha256, quantisation, chat_template_sha256, parameter_count).
    """

    input_id: str
    sample_index: int
    output_raw: str
    teacher_model: str
    teacher_card: Mapping[str, Any]
    prompt_template_id: str
    prompt_template_sha256: str
    sampling: Mapping[str, Any]
    stamp: Mapping[str, Any]
    label_probs: Mapping[str, float] | None = None
    top_logprobs: Sequence[Sequence[Mapping[str, Any]]] | None = None
    trace: str | None = None  # the reasoning trace the teacher sent apart from (or before) its answer


@dataclass(frozen=True)
class AppendResult:
    added: int
    already_present: int


def _dumps(row: Row) -> bytes:
    return orjson.dumps(row.to_record())


def _loads(body: bytes) -> Row:
    return Row.from_record(orjson.loads(body))


class WorkingCopy:
    """A dataset under construction. Open with ``WorkingCopy.open(dir)``; create with ``WorkingCopy.create``."""

    def __init__(self, root: Path, conn: sqlite3.Connection, config: DatasetConfig) -> None:
        self.root = root
        self.conn = conn
        self.config = config

    # -- lifecycle -----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, config: Mapping[str, Any] | None = None) -> WorkingCopy:
        path = Path(root)
        if (path / DB_FILE).exists():
            raise UserError(f"{path} already holds a dataset", hint="open it, or choose another directory")
        data = dict(config or {})
        parse_config(data, "dataset config")  # fail before creating anything
        path.mkdir(parents=True, exist_ok=True)
        (path / "versions").mkdir(exist_ok=True)
        (path / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False) if data else "{}\n")
        return cls.open(path)

    @classmethod
    def open(cls, root: str | Path) -> WorkingCopy:
        path = Path(root)
        if not (path / CONFIG_FILE).exists():
            raise NotFoundError(
                f"{path} is not a dataset working copy (no {CONFIG_FILE})",
                hint="create one with `distillgate dataset init DIR`",
            )
        raw = yaml.safe_load((path / CONFIG_FILE).read_text())
        config = parse_config(raw, str(path / CONFIG_FILE))
        conn = sqlite3.connect(path / DB_FILE, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return cls(path, conn, config)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> WorkingCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    # -- meta ----------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        cur = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,))
        found = cur.fetchone()
        return orjson.loads(found[0]) if found else None

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, orjson.dumps(value, option=orjson.OPT_SORT_KEYS)),
        )

    # -- inputs --------------------------------------------------------------------------------------------
    def add_inputs(self, rows: Iterable[Row]) -> tuple[int, int]:
        """Store ingested rows; rows that already carry an output also become dataset rows. Returns (new, known)."""
        new = known = 0
        with self.transaction() as conn:
            for row in rows:
                template = Row.from_record({**row.to_record(), "output_raw": None, "teacher_model": None})
                cur = conn.execute(
                    "INSERT OR IGNORE INTO inputs(input_id, body) VALUES(?, ?)", (row.input_id, _dumps(template))
                )
                if cur.rowcount:
                    new += 1
                else:
                    known += 1
                if row.output_raw is not None:
                    self._insert_row(conn, row)
        return new, known

    def inputs(self) -> list[Row]:
        return [_loads(b) for (b,) in self.conn.execute("SELECT body FROM inputs ORDER BY rowid")]

    def count_inputs(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM inputs").fetchone()[0])

    # -- rows ----------------------------------------------------------------------------------------------
    @staticmethod
    def _insert_row(conn: sqlite3.Connection, row: Row) -> bool:
        cur = conn.execute(
            "INSERT OR IGNORE INTO rows(row_id, input_id, version, split, filter_status, review_state, label, body)"
            " VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
            (row.row_id, row.input_id, row.version, row.split, row.filter_status, row.review_state, row.label,
             _dumps(row)),
        )
        return bool(cur.rowcount)

    def rows(self) -> list[Row]:
        return [_loads(b) for (b,) in self.conn.execute("SELECT body FROM rows ORDER BY rowid")]

    def iter_row_pages(self, size: int) -> Iterator[tuple[list[int], list[Row]]]:
        """All rows in ``rowid`` order, ``size`` at a time, as (rowids, rows): memory bounded by one page."""
        last = -1
        while True:
            page = self.conn.execute("SELECT rowid, body FROM rows WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                     (last, size)).fetchall()
            if not page:
                return
            last = page[-1][0]
            yield [r for r, _ in page], [_loads(b) for _, b in page]

    def rows_where(self, field: str, value: Any) -> list[Row]:
        """Rows whose ``field`` equals ``value`` (``input_id`` uses its index; other fields a scan in SQLite)."""
        if field == "input_id":
            cur = self.conn.execute("SELECT body FROM rows WHERE input_id=? ORDER BY rowid", (value,))
        elif field in FIELD_NAMES:
            cur = self.conn.execute(
                "SELECT body FROM rows WHERE json_extract(CAST(body AS TEXT), ?) = ? ORDER BY rowid",
                (f"$.{field}", value))
        else:
            raise UserError(f"rows have no field {field!r}", hint="see the row fields in docs/dataset.md")
        return [_loads(b) for (b,) in cur]

    def labels(self) -> list[str]:
        """The distinct final labels of the working copy, sorted."""
        return [str(v) for (v,) in self.conn.execute("SELECT DISTINCT label FROM rows WHERE label IS NOT NULL"
                                                      " ORDER BY label")]

    def count_rows(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    def get(self, row_id: str) -> Row:
        found = self.conn.execute("SELECT body FROM rows WHERE row_id=?", (row_id,)).fetchone()
        if not found:
            raise NotFoundError(f"no row {row_id!r} in {self.root}", hint="list rows with `distillgate dataset show`")
        return _loads(found[0])

    def update_row(self, row: Row, expected_version: int) -> Row:
        """Write ``row`` if the stored version is still ``expected_version``; return it with the version bumped."""
        row.version = expected_version + 1
        cur = self.conn.execute(
            "UPDATE rows SET version=?, split=?, filter_status=?, review_state=?, label=?, body=?"
            " WHERE row_id=? AND version=?",
            (row.version, row.split, row.filter_status, row.review_state, row.label, _dumps(row), row.row_id,
             expected_version),
        )
        if cur.rowcount == 0:
            current = self.get(row.row_id)  # raises NotFoundError when the row is gone
            raise ConflictError(
                f"row {row.row_id!r} changed since you read it (you had version {expected_version}, "
                f"it is now version {current.version})",
                hint="show the row again and redo your change on the current version",
            )
        return row

    def save_build(self, rows: Sequence[Row], read_versions: Mapping[str, int]) -> tuple[int, list[str]]:
        """Write rows computed by a build; rows changed by someone else meanwhile are skipped and returned."""
        changed = 0
        conflicts: list[str] = []
        with self.transaction():
            for row in rows:
                before = read_versions[row.row_id]
                row.version = before
                stored = self.conn.execute("SELECT body FROM rows WHERE row_id=?", (row.row_id,)).fetchone()
                if stored is None:
                    continue
                old = _loads(stored[0])
                if old.version != before:
                    conflicts.append(row.row_id)
                    continue
                if old.content_sha256() == row.content_sha256():
                    continue
                self.update_row(row, before)
                changed += 1
        return changed, conflicts

    # -- generation I/O ------------------------------------------------------------------------------------
    def pending_generation(self, k: int = 1) -> list[tuple[Row, int]]:
        """(input template, sample index) pairs that have no stored row yet, for ``k`` samples per input."""
        have = {(i, r) for i, r in self.conn.execute("SELECT input_id, row_id FROM rows")}
        present = {row_id for _, row_id in have}
        pending: list[tuple[Row, int]] = []
        for template in self.inputs():
            for index in range(k):
                if make_row_id(template.input_id, index) not in present:
                    pending.append((template, index))
        return pending

    def discard_rows(self, row_ids: Sequence[str]) -> int:
        """Delete generated rows (stale answers about to be asked again); their inputs stay. Returns the count."""
        with self.transaction() as conn:
            return sum(conn.execute("DELETE FROM rows WHERE row_id=?", (rid,)).rowcount for rid in row_ids)

    def append_generated(self, samples: Iterable[GeneratedSample]) -> AppendResult:
        """Store generated samples exactly once, in one transaction. Samples already stored are skipped."""
        added = present = 0
        unknown: list[str] = []
        with self.transaction() as conn:
            for sample in samples:
                found = conn.execute("SELECT body FROM inputs WHERE input_id=?", (sample.input_id,)).fetchone()
                if not found:
                    unknown.append(sample.input_id)
                    continue
                template = _loads(found[0])
                template.row_id = make_row_id(sample.input_id, sample.sample_index)
                template.sample_index = sample.sample_index
                template.output_raw = sample.output_raw
                template.trace = sample.trace
                template.teacher_model = sample.teacher_model
                template.teacher_card = dict(sample.teacher_card)
                template.prompt_template_id = sample.prompt_template_id
                template.prompt_template_sha256 = sample.prompt_template_sha256
                template.sampling = dict(sample.sampling)
                template.stamp = dict(sample.stamp)
                template.label_probs = dict(sample.label_probs) if sample.label_probs is not None else None
                template.top_logprobs = (
                    [[dict(t) for t in step] for step in sample.top_logprobs]
                    if sample.top_logprobs is not None else None
                )
                if self._insert_row(conn, template):
                    added += 1
                else:
                    present += 1
            if unknown:  # raised inside the transaction: the whole batch is rolled back
                raise NotFoundError(
                    f"{len(unknown)} generated sample(s) name inputs that were never ingested: {unknown[:5]}",
                    hint="ingest the traffic into this working copy before generating",
                )
        return AppendResult(added=added, already_present=present)


def append_generated(dataset_dir: str | Path, samples: Iterable[GeneratedSample]) -> AppendResult:
    """Convenience for the generator: open the working copy at ``dataset_dir`` and append ``samples``."""
    with WorkingCopy.open(dataset_dir) as wc:
        return wc.append_generated(samples)
