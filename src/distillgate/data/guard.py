"""The dataset guard: training must never see golden, test or held-out rows, and learns the human answer.

Every student family and recipe gets its rows from one call, ``training_input(dataset, rows_file=None)``:

* ``dataset`` is a frozen dataset version (its directory, a working copy's HEAD, or an id); never a free path.
  Its ``rows.parquet`` is hash-checked against the manifest. Only rows of the trainable splits asked for
  (``train``, optionally ``val``) that passed the filters are returned; golden, test and holdout rows stay out.
* ``rows_file`` (optional) narrows training to some rows of that version: every row in it must be a row of the
  version, byte for byte in what training reads (input, output, label, label distributions, split, review trail);
  a row the version does not hold, or holds with other content, refuses the whole file. A version's own
  ``rows.parquet`` is accepted as it is (its protected rows are left out, as above).
* Protected rows are refused *by hash*, not only by split and id: a row whose input text hashes to the input of a
  golden, test or holdout row of the version (``text_sha256``) is refused even when it is renamed or relabelled.

``ensure_trainable(rows, golden_ids=..., protected_inputs=...)`` is that last check on its own, for any row set.
``training_target(row)`` is the answer a row teaches: a corrected row's human answer in every recipe.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillgate.errors import DatasetGuardError

TRAINABLE_SPLITS = frozenset({"train", "val"})
PROTECTED_SPLITS = frozenset({"test", "golden", "holdout"})
# what training reads of a row: a rows file must agree with the frozen version on all of these
TRAINED_FIELDS = ("input", "output", "label", "label_probs", "top_logprobs", "split", "filter_status", "edited",
                  "review_state", "review_after", "task")


def _input_hash(row: Mapping[str, Any]) -> str:
    from distillgate.data.schema import text_sha256

    return text_sha256(str(row.get("input") or ""))


def ensure_trainable(rows: Iterable[Mapping[str, Any]], *, golden_ids: Collection[str] = (),
                     protected_inputs: Collection[str] = ()) -> int:
    """Raise ``DatasetGuardError`` if any row may not be trained on; return the number of rows checked.

    A row is refused when its split is not a training split, its ``row_id`` is a hash-locked golden id, or the
    hash of its input text is in ``protected_inputs`` (the inputs of golden/test/holdout rows).
    """
    golden = set(golden_ids)
    protected = set(protected_inputs)
    refused: list[str] = []
    count = 0
    for row in rows:
        count += 1
        split = row.get("split")
        row_id = str(row.get("row_id", f"#{count - 1}"))
        if split not in TRAINABLE_SPLITS or row_id in golden:
            refused.append(f"{row_id} (split={split!r})")
        elif protected and _input_hash(row) in protected:
            refused.append(f"{row_id} (its input is a golden/test/holdout input)")
    if refused:
        shown = ", ".join(refused[:5]) + (" …" if len(refused) > 5 else "")
        raise DatasetGuardError(
            f"refusing to train on {len(refused)} protected row(s): {shown}",
            hint="train only on the 'train'/'val' splits of a frozen dataset version; golden, test and holdout "
            "rows are for evaluation",
        )
    return count


def is_corrected(row: Mapping[str, Any]) -> bool:
    """Whether a reviewer corrected ``row``'s answer (its correction, not the teacher's belief, is then taught)."""
    return row.get("review_state") == "corrected" or bool(row.get("edited"))


def training_target(row: Mapping[str, Any]) -> str | None:
    """The answer ``row`` teaches. A reviewer's correction wins: a corrected plain-label row teaches its corrected
    ``label`` (its ``output`` still holds the teacher's label); a corrected structured row already carries the
    reviewer's answer in ``output`` (``review_after`` has it). Otherwise the normalised teacher ``output``, or
    ``label`` when there is none."""
    output, label = row.get("output"), row.get("label")
    after = row.get("review_after")
    if is_corrected(row) and label not in (None, "") and not (isinstance(after, Mapping) and "output" in after):
        return str(label)
    if output not in (None, ""):
        return str(output)
    return None if label in (None, "") else str(label)


@dataclass(frozen=True)
class TrainingInput:
    """What a student trains on: the rows, and the frozen version they come from (for the run record)."""

    rows: list[dict[str, Any]]
    version_id: str
    version_dir: Path
    manifest: dict[str, Any]
    rows_file: str | None


def _protected(records: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    golden = set(manifest.get("golden", {}).get("row_ids", ()))
    inputs = {_input_hash(r) for r in records if r.get("split") in PROTECTED_SPLITS or r.get("row_id") in golden}
    return golden, inputs


def _read_rows_file(path: Path) -> list[dict[str, Any]]:
    from distillgate.errors import NotFoundError, UserError
    from distillgate.jsonl import iter_objects

    if not path.is_file():
        raise NotFoundError(f"rows file {str(path)!r} does not exist",
                            hint="omit 'rows' to train on the version's train split")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        from distillgate.data.schema import table_to_records

        return table_to_records(pq.read_table(path))
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return list(iter_objects(path))
    raise UserError(f"cannot read rows from {path.name!r}", hint="use a .jsonl or .parquet file")


def training_input(dataset: str | Path, *, rows_file: str | Path | None = None,
                   splits: Sequence[str] = ("train",)) -> TrainingInput:
    """The rows a student may train on, from a frozen version (see the module docstring). Raises
    ``DatasetGuardError`` for protected rows or a rows file that does not match the version."""
    from distillgate.data.versions import MANIFEST, ROWS_FILE, read_version

    wanted = set(splits)
    if not wanted or wanted - TRAINABLE_SPLITS:
        raise DatasetGuardError(
            f"refusing to train on protected split(s) {sorted(wanted - TRAINABLE_SPLITS) or '(none)'}",
            hint="train on 'train' (and 'val'); golden, test and holdout rows are for evaluation")
    version_dir, manifest, records = read_version(dataset)  # rows.parquet must match the manifest's hash
    golden, protected = _protected(records, manifest)
    if rows_file is None or Path(rows_file).resolve() == (version_dir / ROWS_FILE).resolve():
        chosen = [r for r in records if r.get("filter_status") == "pass" and r.get("split") in wanted]
    else:
        by_id = {str(r["row_id"]): r for r in records}
        given = _read_rows_file(Path(rows_file))
        ensure_trainable(given, golden_ids=golden, protected_inputs=protected)
        mismatched = []
        for i, row in enumerate(given):
            frozen = by_id.get(str(row.get("row_id")))
            if frozen is None or any(row.get(k) != frozen.get(k) for k in TRAINED_FIELDS if k in row):
                mismatched.append(str(row.get("row_id", f"#{i}")))
        if mismatched:
            shown = ", ".join(mismatched[:5]) + (" …" if len(mismatched) > 5 else "")
            raise DatasetGuardError(
                f"{rows_file}: {len(mismatched)} row(s) do not match frozen version "
                f"{str(manifest['version_id'])[:16]} ({version_dir / MANIFEST}): {shown}",
                hint="train on the version itself (omit 'rows'), or on rows copied unchanged from it")
        chosen = [by_id[str(r["row_id"])] for r in given
                  if by_id[str(r["row_id"])].get("filter_status") == "pass"
                  and by_id[str(r["row_id"])].get("split") in wanted]
    ensure_trainable(chosen, golden_ids=golden, protected_inputs=protected)
    return TrainingInput(chosen, str(manifest["version_id"]), version_dir, manifest,
                         None if rows_file is None else str(rows_file))
