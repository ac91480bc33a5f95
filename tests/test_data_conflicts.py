"""Label conflicts (one text, two labels) are a leakage class of their own, in the builder's split and in a
dataset's own published split (train file vs test file), on banking77 and on the Home Assistant intents."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from distillgate.cli.main import main
from distillgate.data.leakage import label_conflicts, leakage_check, published_split_rows

DATA = Path(__file__).resolve().parent.parent / "data"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def row(row_id: str, text: str, label: str | None, split: str, input_id: str | None = None) -> dict[str, Any]:
    return {"row_id": row_id, "input_id": input_id or row_id, "input": text, "label": label, "split": split}


def test_same_words_two_labels_is_a_conflict_within_or_across_splits() -> None:
    rows = [row("a", "Turn on the kitchen lights!", "HassTurnOn", "train"),
            row("b", "turn on the  kitchen lights", "HassTurnOff", "test"),  # case, spacing, punctuation differ
            row("c", "pause the music", "HassMediaPause", "train"),
            row("d", "Pause the music.", "HassMediaUnpause", "train"),
            row("e", "what time is it", "HassGetCurrentTime", "train"),
            row("f", "what time is it", "HassGetCurrentTime", "test"),  # same label: a near-duplicate, no conflict
            row("g", "hello", None, "train"), row("h", "hello", "HassRespond", "test")]  # no label: skipped
    found = label_conflicts(rows)
    assert [(c.text, sorted(c.rows), c.across_splits) for c in found] == [
        ("Turn on the kitchen lights!", ["HassTurnOff", "HassTurnOn"], True),
        ("pause the music", ["HassMediaPause", "HassMediaUnpause"], False)]
    assert found[0].rows["HassTurnOff"] == [("b", "test")] and found[0].splits == ["test", "train"]
    report = leakage_check(rows)
    assert len(report.conflicts) == 2 and report.conflicts_across == 1 and not report.clean


def test_samples_of_one_input_disagreeing_are_not_a_conflict() -> None:
    """k samples of one input with different teacher labels are teacher disagreement, not a dataset conflict."""
    rows = [row("i1:0", "freeze my card", "card_lost", "train", "i1"),
            row("i1:1", "freeze my card", "card_blocked", "train", "i1")]
    assert label_conflicts(rows) == []
    rows.append(row("i2:0", "Freeze my card", "card_lost", "test", "i2"))  # another input: now it conflicts
    assert len(label_conflicts(rows)) == 1


def test_banking77_published_split_has_two_real_conflicts() -> None:
    rows = published_split_rows({"train": DATA / "banking77" / "train.csv", "test": DATA / "banking77" / "test.csv"},
                                label_column="category")
    found = {c.text: {label: members for label, members in c.rows.items()} for c in label_conflicts(rows)}
    assert found == {
        "Has my top up gone through?": {"pending_top_up": [("train:2003", "train")],
                                        "top_up_reverted": [("train:3161", "train")]},
        "What are the fees for top-ups?": {"top_up_by_bank_transfer_charge": [("test:619", "test")],
                                           "top_up_by_card_charge": [("test:2839", "test")]},
    }


def test_published_split_cli_on_home_assistant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = DATA / "home_assistant" / "train.csv", DATA / "home_assistant" / "test.csv"
    code, out, _ = cli(capsys, "dataset", "leakage", "--train", str(train), "--test", str(test), "--json")
    report = json.loads(out)
    assert code == 0 and report["checked"] == 385 and report["conflicts"] == []
    assert len(report["hits"]) == 9  # near-copies across the published split, all with the same intent
    # a published test file that relabels a training sentence: reported across splits, --strict exits 2
    with test.open(newline="") as fh:
        records = list(csv.DictReader(fh))
    with train.open(newline="") as fh:
        first = next(csv.DictReader(fh))
    records.append({"text": first["text"].upper() + "!", "label": "out_of_scope", "source_intent": "x"})
    bad = tmp_path / "test.csv"
    with bad.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label", "source_intent"])
        writer.writeheader()
        writer.writerows(records)
    code, out, err = cli(capsys, "dataset", "leakage", "--train", str(train), "--test", str(bad), "--strict")
    assert code == 2 and "1 text(s) carry more than one label" in err
    assert "label conflicts: 1 text(s) with more than one label (1 across splits)" in out
    assert f"{first['label']}: train:1 [train]; out_of_scope: test:386 [test]" in out
    code, _, err = cli(capsys, "dataset", "leakage", "--train", str(train), "--test", str(bad))
    assert code == 0  # reported, not fatal, without --strict
    code, _, err = cli(capsys, "dataset", "leakage", "--train", str(train), "--test", str(bad), "--map", "label=x")
    assert code == 1 and "no column(s) ['x']" in err and "--map" in err
    code, _, err = cli(capsys, "dataset", "leakage", "--train", str(train))
    assert code == 1 and "--train and --test go together" in err


def test_build_reports_conflicts_in_the_working_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    traffic = tmp_path / "traffic.csv"
    lines = ["id,text,intent,answer",
             # the traffic labels one text two ways; the builder drops the second copy as an exact duplicate
             "1,turn on the porch light,HassTurnOn,HassTurnOn", "2,Turn on the porch light.,HassTurnOff,HassTurnOn",
             # two texts whose answers (the final label) disagree; exact_duplicates off keeps both in use
             "3,pause the tv,HassMediaPause,HassMediaPause", "4,Pause the TV!,HassMediaPause,HassMediaUnpause",
             "5,what is the date,HassGetCurrentDate,HassGetCurrentDate"]
    traffic.write_text("\n".join(lines) + "\n")
    ds = str(tmp_path / "ds")
    assert cli(capsys, "dataset", "init", ds)[0] == 0
    code, _, err = cli(capsys, "dataset", "ingest", ds, str(traffic), "--map", "input=text", "--map", "record_id=id",
                       "--map", "reference_label=intent", "--map", "output=answer")
    assert code == 0, err
    code, out, err = cli(capsys, "dataset", "build", ds)
    assert code == 0, err
    assert "label conflicts: 2 text(s) with more than one label (0 across splits, 2 resolved by excluded copies)" \
        in out
    assert "reference_label 'turn on the porch light': HassTurnOn:" in out and "HassTurnOff:" in out
    code, out, _ = cli(capsys, "dataset", "leakage", ds, "--strict")
    assert code == 0  # every conflicting copy but one is excluded: nothing conflicting is trained or tested on
    # with exact-duplicate removal off both copies stay in use, and the conflicts count
    code, _, err = cli(capsys, "dataset", "init", str(tmp_path / "ds2"), "--set", "filters.exact_duplicates=false")
    assert code == 0, err
    cli(capsys, "dataset", "ingest", str(tmp_path / "ds2"), str(traffic), "--map", "input=text",
        "--map", "record_id=id", "--map", "reference_label=intent", "--map", "output=answer")
    code, out, err = cli(capsys, "dataset", "build", str(tmp_path / "ds2"), "--json")
    info = json.loads(out)
    assert (info["label_conflicts"], info["label_conflicts_in_use"]) == (2, 2)
    code, out, err = cli(capsys, "dataset", "leakage", str(tmp_path / "ds2"), "--strict")
    assert code == 2 and "2 text(s) carry more than one label" in err
