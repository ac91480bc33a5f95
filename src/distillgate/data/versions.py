"""Frozen, content-addressed dataset versions; row-level diffs with causes; ``load_version`` for trainers.

A version is a directory ``<working copy>/versions/<id16>/`` holding:

    rows.parquet     every row (schema ``distillgate.data.schema``), failed rows with split ``excluded``
    manifest.json    version id, parent, row counts per split/label/status, hashes, the teacher prompts/models
                     and the full filter/normalisation/dedup/split configuration in force, release notes
    NOTES.md         the release notes

The id is the SHA-256 of the manifest's content (everything but ``version_id`` and ``created_at``), which
includes the rows' content hash and the parent id, so equal content gives the same id. Once a version with golden
rows is frozen the golden set is hash-locked in the working copy: later freezes verify every locked row is still
golden and unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from distillgate.canonical import sha256_file
from distillgate.data.schema import SCHEMA_VERSION, Row, rows_sha256, table_to_records, write_parquet
from distillgate.data.store import WorkingCopy
from distillgate.data.synthetic import check_frozen, synthetic_counts
from distillgate.errors import IntegrityError, NotFoundError, UserError

MANIFEST = "manifest.json"
ROWS_FILE = "rows.parquet"
NOTES = "NOTES.md"
HEAD = "HEAD"


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)



@dataclass
class Version:
    path: Path
    manifest: dict[str, Any]
    rows: list[Row]

    @property
    def version_id(self) -> str:
        return str(self.manifest["version_id"])


def golden_lock_hash(lock: Mapping[str, str]) -> str:
    return hashlib.sha256(_canonical(sorted(lock.items()))).hexdigest()


def _counts(rows: Sequence[Row]) -> dict[str, Any]:
    split_label: dict[str, dict[str, int]] = {}
    for row in rows:
        per = split_label.setdefault(row.split or "none", {})
        per[row.label or "<none>"] = per.get(row.label or "<none>", 0) + 1
    return {
        "split": dict(sorted(Counter(r.split or "none" for r in rows).items())),
        "label": dict(sorted(Counter(r.label or "<none>" for r in rows).items())),
        "filter_status": dict(sorted(Counter(r.filter_status for r in rows).items())),
        "filter_reasons": dict(sorted(Counter(c for r in rows for c in r.filter_reasons).items())),
        "edited": sum(1 for r in rows if r.edited),
        "split_label": {k: dict(sorted(v.items())) for k, v in sorted(split_label.items())},
        **({"synthetic": synthetic_counts(rows)} if any(r.synthetic is not None for r in rows) else {}),
    }


def _teacher(rows: Sequence[Row]) -> dict[str, Any]:
    prompts: dict[str, list[str]] = {}
    cards: dict[bytes, dict[str, Any]] = {}
    for row in rows:
        if row.prompt_template_id:
            shas = prompts.setdefault(row.prompt_template_id, [])
            if row.prompt_template_sha256 and row.prompt_template_sha256 not in shas:
                shas.append(row.prompt_template_sha256)
        if row.teacher_card:
            cards.setdefault(_canonical(row.teacher_card), row.teacher_card)
    return {
        "models": sorted({r.teacher_model for r in rows if r.teacher_model}),
        "prompt_templates": {k: sorted(v) for k, v in sorted(prompts.items())},
        "cards": [cards[k] for k in sorted(cards)],
        "sampling": sorted({_canonical(r.sampling).decode() for r in rows if r.sampling}),
    }


def verify_golden(rows: Sequence[Row], lock: Mapping[str, str]) -> None:
    by_id = {r.row_id: r for r in rows}
    problems: list[str] = []
    for row_id, expected in sorted(lock.items()):
        row = by_id.get(row_id)
        if row is None:
            problems.append(f"{row_id}: missing")
        elif row.split != "golden":
            problems.append(f"{row_id}: now in split {row.split!r}")
        elif row.golden_sha256() != expected:
            problems.append(f"{row_id}: content changed")
    if problems:
        raise IntegrityError(
            f"the hash-locked golden set changed ({len(problems)} row(s)): " + "; ".join(problems[:5]),
            hint="golden rows may not change once frozen; restore them (undo the edit or filter change) "
            "or start a new dataset",
        )


def freeze(wc: WorkingCopy, *, notes: str = "") -> Version:
    """Freeze the working copy into a content-addressed version and move HEAD to it."""
    rows = wc.rows()
    if not rows:
        raise UserError(f"{wc.root} has no rows to freeze", hint="ingest and build first")
    if any(r.filter_status == "pending" or r.split is None for r in rows):
        raise UserError("some rows were never built (no filter verdict or split)",
                        hint="run `distillgate dataset build DIR` before freezing")
    check_frozen(rows, wc.config.synthetic.max_train_share)  # synthetic rows: train only, within the share
    lock: dict[str, str] | None = wc.get_meta("golden_lock")
    if lock:
        verify_golden(rows, lock)
    else:
        lock = {r.row_id: r.golden_sha256() for r in rows if r.split == "golden"}
    head = wc.root / HEAD
    parent = head.read_text().strip() if head.exists() else None
    parent_version = open_version(wc.versions_dir / parent[:16]) if parent else None
    config = wc.config.model_dump(mode="json")
    content: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": wc.config.name,
        "parent": parent,
        "rows": len(rows),
        "rows_sha256": rows_sha256(rows),
        "counts": _counts(rows),
        "golden": {"count": len(lock), "sha256": golden_lock_hash(lock), "row_ids": sorted(lock)},
        "teacher": _teacher(rows),
        "config": config,
        "user_notes": notes,
    }
    notes_text = release_notes(parent_version, rows, content)
    content["release_notes"] = notes_text
    version_id = hashlib.sha256(_canonical(content)).hexdigest()
    target = wc.versions_dir / version_id[:16]
    if not target.exists():
        wc.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=wc.versions_dir, prefix=".freeze-"))
        try:
            write_parquet(rows, tmp / ROWS_FILE)
            manifest = {
                "version_id": version_id,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                **content,
                "files": {ROWS_FILE: sha256_file(tmp / ROWS_FILE)},
            }
            (tmp / MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2))
            (tmp / NOTES).write_text(notes_text)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if lock and not wc.get_meta("golden_lock"):
        wc.set_meta("golden_lock", lock)
    tmp_head = head.with_name(f".{HEAD}.tmp")
    tmp_head.write_text(version_id + "\n")
    os.replace(tmp_head, head)  # HEAD moves atomically
    return open_version(target)


def resolve_version(ref: str | Path, root: str | Path | None = None) -> Path:
    """A version directory from: its path, a working copy dir (its HEAD), or an id (prefix) under ``root``."""
    path = Path(ref)
    if (path / MANIFEST).exists():
        return path
    if (path / HEAD).exists():
        head = (path / HEAD).read_text().strip()
        return path / "versions" / head[:16]
    base = Path(root) if root is not None else Path(os.environ.get("DISTILLGATE_DATASET", "."))
    versions = base / "versions" if (base / "versions").is_dir() else base
    ref_text = str(ref)
    if versions.is_dir() and len(ref_text) >= 6:
        matches = [p for p in versions.iterdir() if p.is_dir() and (ref_text.startswith(p.name) or
                                                                     p.name.startswith(ref_text))]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UserError(f"version id {ref_text!r} is ambiguous", hint="give more characters of the id")
    raise NotFoundError(
        f"no dataset version {ref_text!r}" + (f" under {versions}" if versions.is_dir() else ""),
        hint="pass a version directory, a working copy directory, or an id with --root / $DISTILLGATE_DATASET",
    )


def _read_checked(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    manifest = orjson.loads((path / MANIFEST).read_bytes())
    expected = manifest.get("files", {}).get(ROWS_FILE)
    if expected != sha256_file(path / ROWS_FILE):
        raise IntegrityError(
            f"{path / ROWS_FILE} does not match the hash in its manifest",
            hint="the version was modified after freezing; restore it from an export or re-freeze",
        )
    return manifest, table_to_records(pq.read_table(path / ROWS_FILE))


def read_version(ref: str | Path, root: str | Path | None = None) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """A frozen version's directory, manifest and rows (hash-checked against the manifest)."""
    path = resolve_version(ref, root)
    manifest, records = _read_checked(path)
    return path, manifest, records


def open_version(ref: str | Path, root: str | Path | None = None) -> Version:
    path = resolve_version(ref, root)
    manifest, records = _read_checked(path)
    return Version(path, manifest, [Row.from_record(r) for r in records])


def load_version(ref: str | Path, *, root: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of a frozen version as dicts (hash-checked). For trainers and evaluators.

    ``ref``: a version directory, a working copy directory (its HEAD version), or a version id (prefix) under
    ``root`` (default ``$DISTILLGATE_DATASET`` or the current directory). Filter on ``split`` and
    ``filter_status == "pass"``; ``label_probs``/``top_logprobs`` are dicts/lists (or None).
    """
    _, records = _read_checked(resolve_version(ref, root))
    return records


def load_trainable(
    ref: str | Path, *, splits: Sequence[str] = ("train",), root: str | Path | None = None
) -> list[dict[str, Any]]:
    """Rows of ``splits`` (train and/or val) that passed the filters, checked by the dataset guard.

    Raises ``DatasetGuardError`` when asked for a protected split, so training code cannot get golden/test rows.
    """
    from distillgate.data.guard import training_input

    return training_input(resolve_version(ref, root), splits=splits).rows


# -- diffs ---------------------------------------------------------------------------------------------------

_CAUSES: list[tuple[str, tuple[str, ...]]] = [
    ("new teacher prompt", ("prompt_template_id", "prompt_template_sha256")),
    ("new teacher model", ("teacher_model", "teacher_card")),
    ("new sampling settings", ("sampling",)),
    ("human edit", ("review_state", "edited", "reviewer", "review_reason", "review_after")),
    ("input change", ("input", "source_file", "source_record_id", "source_group", "source_timestamp")),
    ("dedup change", ("dup_cluster", "exact_dup_of")),
    ("filter change", ("filter_status", "filter_reasons")),
    ("split change", ("split", "split_reason")),
]


@dataclass
class RowChange:
    row_id: str
    kind: str  # added | removed | changed
    fields: list[str] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)


@dataclass
class VersionDiff:
    a: str | None
    b: str
    changes: list[RowChange]
    config_changes: list[str]

    def counts(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for change in self.changes:
            if change.kind != "changed":
                out[change.kind] += 1
            for cause in change.causes:
                out[cause] += 1
        return dict(out)


_SKIP = {"version", "reviewed_at", "review_before", "stamp", "agreement"}


def _row_change(old: Row, new: Row) -> RowChange | None:
    a, b = old.to_record(), new.to_record()
    fields = [k for k in a if k not in _SKIP and a[k] != b[k]]
    if not fields:
        return None
    causes = [cause for cause, names in _CAUSES if any(f in names for f in fields)]
    touched = set(fields)
    if "output_raw" in touched and "new teacher prompt" not in causes and "new teacher model" not in causes:
        causes.insert(0, "new teacher answer")
    if "output" in touched and "output_raw" not in touched and "human edit" not in causes:
        causes.append("normalisation change")
    if "label" in touched and "human edit" not in causes and "output_raw" not in touched:
        causes.append("label change")
    return RowChange(old.row_id, "changed", fields, causes,
                     {f: a[f] for f in fields}, {f: b[f] for f in fields})


def _config_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            label = {"normalise": "normalisation", "filters": "filters", "tasks": "per-task filters"}.get(key, key)
            out.append(f"{label} configuration changed")
    return out


def diff_rows(old: Sequence[Row], new: Sequence[Row]) -> list[RowChange]:
    before = {r.row_id: r for r in old}
    after = {r.row_id: r for r in new}
    changes: list[RowChange] = []
    for row_id in sorted(set(before) | set(after)):
        if row_id not in before:
            changes.append(RowChange(row_id, "added", causes=["new row"]))
        elif row_id not in after:
            changes.append(RowChange(row_id, "removed", causes=["row removed"]))
        else:
            change = _row_change(before[row_id], after[row_id])
            if change:
                changes.append(change)
    return changes


def diff(a: Version, b: Version) -> VersionDiff:
    return VersionDiff(
        a.version_id, b.version_id, diff_rows(a.rows, b.rows),
        _config_changes(a.manifest.get("config", {}), b.manifest.get("config", {})),
    )


def release_notes(parent: Version | None, rows: Sequence[Row], content: Mapping[str, Any]) -> str:
    counts = content["counts"]
    lines = [f"# {content['name']}", ""]
    if content.get("user_notes"):
        lines += [str(content["user_notes"]), ""]
    lines.append(f"{content['rows']} rows; splits: " + ", ".join(f"{k}={v}" for k, v in counts["split"].items()))
    lines.append(f"golden rows (hash-locked): {content['golden']['count']}; human-edited rows: {counts['edited']}")
    norm = content["config"]["normalise"]
    lines.append(
        f"normalisation: keys {norm['key_aliases']} -> label key {norm['label_key']!r}; "
        f"{len(norm['label_aliases'])} label alias(es); canonical labels {norm['canonical_labels']}; "
        f"refusals -> {norm['refusal_text']!r} ({norm['refusal_label']}); explanations <= "
        f"{norm['max_explanation_chars']} chars"
    )
    filters = content["config"]["filters"]
    active = sorted(k for k, v in filters.items() if v not in (None, False, []))
    lines.append("filters in force: " + ", ".join(active))
    teacher = content["teacher"]
    if teacher["prompt_templates"]:
        lines.append("teacher prompts: " + ", ".join(f"{k} ({', '.join(h[:12] for h in v)})"
                                                     for k, v in teacher["prompt_templates"].items()))
    if teacher["models"]:
        lines.append("teacher models: " + ", ".join(teacher["models"]))
    if parent is None:
        lines.append("first version (no parent)")
    else:
        changes = diff_rows(parent.rows, rows)
        summary = Counter(c for ch in changes for c in ch.causes)
        lines.append(f"parent: {parent.version_id[:16]}")
        for cause, n in summary.most_common():
            lines.append(f"- {cause}: {n} row(s)")
        for item in _config_changes(parent.manifest.get("config", {}), content["config"]):
            lines.append(f"- {item}")
        if not changes:
            lines.append("- no row changes")
    return "\n".join(lines) + "\n"
