"""Freeze (content-addressed, golden hash-lock), load_version, diff with causes, export to file:// and s3://."""

from __future__ import annotations

import json
import socket

import orjson
import pyarrow.parquet as pq
import pytest

from _data_support import banking_rows, make_dataset, sample, teacher_answer
from distillgate.data import review
from distillgate.data.config import parse_config
from distillgate.data.export import export_version
from distillgate.data.pipeline import build
from distillgate.data.store import WorkingCopy
from distillgate.data.versions import diff, freeze, load_version
from distillgate.destinations import read_file
from distillgate.errors import DestinationError, IntegrityError, NotFoundError, UserError

from conftest import run_cli


def _banking_records(n: int = 120) -> list[dict[str, str]]:
    return [{"id": str(i), "text": r["text"], "answer": teacher_answer(r["category"])}
            for i, r in enumerate(banking_rows(limit=n))]


@pytest.fixture
def frozen(tmp_path):
    wc = make_dataset(tmp_path, _banking_records(), {"split": {"golden": {"fraction": 0.1}}})
    build(wc)
    version = freeze(wc, notes="first cut")
    yield wc, version
    wc.close()


def test_freeze_is_content_addressed_with_manifest(frozen):
    wc, v1 = frozen
    manifest = v1.manifest
    assert v1.path.name == v1.version_id[:16] and len(v1.version_id) == 64
    assert manifest["parent"] is None and manifest["rows"] == 120
    assert sum(manifest["counts"]["split"].values()) == 120
    assert manifest["counts"]["label"]["card_arrival"] > 0
    assert manifest["config"]["filters"]["near_duplicates"] is True
    assert manifest["config"]["normalise"]["label_key"] == "category"
    assert manifest["golden"]["count"] == manifest["counts"]["split"].get("golden", 0) > 0
    assert "first cut" in (v1.path / "NOTES.md").read_text()
    again = freeze(wc)  # same content and parent HEAD moved: a child with no changes
    assert again.manifest["parent"] == v1.version_id
    assert "no row changes" in again.manifest["release_notes"]


def test_same_content_gives_same_id(tmp_path):
    ids = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        wc = make_dataset(tmp_path / sub, _banking_records(40))
        build(wc)
        ids.append(freeze(wc).version_id)
    assert ids[0] == ids[1]


def test_load_version_for_trainers_and_tamper_check(frozen):
    wc, v1 = frozen
    rows = load_version(v1.path)
    assert len(rows) == 120 and {"row_id", "input", "output", "output_raw", "label", "label_probs",
                                   "top_logprobs", "split", "filter_status", "edited"} <= set(rows[0])
    assert load_version(wc.root) == rows  # a working copy resolves to its HEAD
    assert load_version(v1.version_id[:10], root=wc.root) == rows
    table = pq.read_table(v1.path / "rows.parquet")
    pq.write_table(table.slice(0, 10), v1.path / "rows.parquet")
    with pytest.raises(IntegrityError, match="does not match"):
        load_version(v1.path)
    with pytest.raises(NotFoundError):
        load_version("deadbeefdead", root=wc.root)


def test_load_trainable_refuses_protected_splits(frozen):
    from distillgate.data.versions import load_trainable
    from distillgate.errors import DatasetGuardError

    _, v1 = frozen
    train = load_trainable(v1.path)
    assert train and {r["split"] for r in train} == {"train"} and {r["filter_status"] for r in train} == {"pass"}
    both = load_trainable(v1.path, splits=("train", "val"))
    assert len(both) > len(train)
    with pytest.raises(DatasetGuardError, match="protected"):
        load_trainable(v1.path, splits=("train", "golden"))


def test_golden_lock_detects_changes(frozen):
    wc, _ = frozen
    golden = next(r for r in wc.rows() if r.split == "golden")
    golden.label = "something_else"
    golden.output = '{"category":"something_else"}'
    wc.update_row(golden, golden.version)
    with pytest.raises(IntegrityError, match="hash-locked golden set changed"):
        freeze(wc)


def test_diff_explains_changes(frozen, tmp_path):
    wc, v1 = frozen
    rows = wc.rows()
    edited = next(r for r in rows if r.split == "train")
    review.correct(wc, edited.row_id, "alice", edited.version, "card_linking", "linking, not arrival")
    prompt_changed = next(r for r in rows if r.split == "train" and r.row_id != edited.row_id)
    prompt_changed.prompt_template_sha256 = "11" * 32
    prompt_changed.output_raw = teacher_answer("card_arrival", "rewritten by the new prompt")
    wc.update_row(prompt_changed, prompt_changed.version)
    # a filter change in the config: forbid a phrase that one answer uses
    target = next(r for r in rows if r.split == "test")
    target.output_raw = teacher_answer(target.label or "x", "as an AI language model I say so")
    wc.update_row(target, target.version)
    build(wc)
    v2 = freeze(wc)
    result = diff(v1, v2)
    by_id = {c.row_id: c for c in result.changes}
    assert "human edit" in by_id[edited.row_id].causes
    assert "new teacher prompt" in by_id[prompt_changed.row_id].causes
    assert "filter change" in by_id[target.row_id].causes
    assert v2.manifest["parent"] == v1.version_id
    notes = v2.manifest["release_notes"]
    assert "human edit: 1 row(s)" in notes and "new teacher prompt: 1 row(s)" in notes
    out = run_cli("dataset", "diff", str(v1.path), str(v2.path))
    assert out.returncode == 0, out.stderr
    assert edited.row_id in out.stdout and "human edit" in out.stdout


def test_export_file_formats(frozen, tmp_path):
    _, v1 = frozen
    dest = tmp_path / "out"
    written = export_version(v1, dest.as_uri(), formats=("jsonl", "parquet", "hf"))
    base = dest / v1.version_id[:16]
    assert (base / "rows.parquet").read_bytes() == (v1.path / "rows.parquet").read_bytes()
    lines = (base / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 120 and json.loads(lines[0])["row_id"]
    card = (base / "hf" / "README.md").read_text()
    assert "config_name: default" in card and "split: train" in card and "split: validation" in card
    train = pq.read_table(base / "hf" / "data" / "train-00000-of-00001.parquet")
    assert set(train.column("split").to_pylist()) == {"train"}
    assert set(train.column("filter_status").to_pylist()) == {"pass"}
    assert len(written) == len(list(base.rglob("*.*")))
    import datasets  # the `test` extra installs it

    loaded = datasets.load_dataset(str(base / "hf"), cache_dir=str(tmp_path / "hf-cache"))
    assert set(loaded) >= {"train", "validation", "test"}
    assert loaded["train"].num_rows == train.num_rows
    assert loaded["train"][0]["row_id"] == train.column("row_id")[0].as_py()
    with pytest.raises(DestinationError, match="DESTINATION_NOT_APPROVED"):
        export_version(v1, (tmp_path / "elsewhere").as_uri(), allowed=[dest.as_uri()])
    with pytest.raises(DestinationError, match="DESTINATION_NOT_APPROVED"):
        export_version(v1, "s3://bucket/x/")
    with pytest.raises(UserError, match="format"):
        export_version(v1, dest.as_uri(), formats=("csv",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_export_to_s3_moto_server(frozen, monkeypatch, tmp_path):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("DISTILLGATE_S3_ENDPOINT", endpoint)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="datasets")
        _, v1 = frozen
        written = export_version(v1, "s3://datasets/banking/", formats=("parquet",),
                                 allowed=["s3://datasets/banking/"])
        manifest_url = f"s3://datasets/banking/{v1.version_id[:16]}/manifest.json"
        assert manifest_url in written
        assert orjson.loads(read_file(manifest_url))["version_id"] == v1.version_id
        parquet = read_file(f"s3://datasets/banking/{v1.version_id[:16]}/rows.parquet")
        assert parquet == (v1.path / "rows.parquet").read_bytes()
        policy = tmp_path / "policy.json"
        policy.write_text(orjson.dumps({"policy_id": "p", "allowed_projects": ["bank"], "allowed_outputs": ["labels"],
                                        "allowed_destinations": ["s3://datasets/"]}).decode())
        gov = ["--db", str(tmp_path / "gov.db"), "--project", "bank", "--run", "r1", "--user", "alice"]
        out = run_cli("dataset", "export", str(v1.path), "s3://datasets/cli/", "--policy", str(policy), *gov)
        assert out.returncode == 0, out.stderr
        assert f"s3://datasets/cli/{v1.version_id[:16]}/rows.jsonl" in out.stdout
        # the policy judges the destination (there is no --allow to widen it), and both answers are logged
        denied = run_cli("dataset", "export", str(v1.path), "s3://elsewhere/cli/", "--policy", str(policy), *gov)
        assert denied.returncode == 2 and "DESTINATION_NOT_APPROVED" in denied.stderr
        from distillgate.ledger.store import Store

        with Store.open(tmp_path / "gov.db") as store:
            decisions = [e.body for e in store.entries(kind="decision")]
            exports = [e.body for e in store.entries(kind="export")]
        assert [(d["decision"], d["destination"]) for d in decisions] == [
            ("allow", "s3://datasets/cli/"), ("deny", "s3://elsewhere/cli/")]
        assert decisions[0]["extra"]["artifact"] == "dataset" and len(exports) == 1
    finally:
        server.stop()


def test_dataset_cli_end_to_end(tmp_path):
    traffic = tmp_path / "traffic.csv"
    rows = banking_rows(limit=200)
    traffic.write_text("msg,intent,account\n" + "".join(
        f"\"{r['text']}\",{r['category']},acct{i % 40}\n" for i, r in enumerate(rows)))
    ds = str(tmp_path / "ds")
    assert run_cli("dataset", "init", ds, "--set", "split.golden.fraction=0.1").returncode == 0
    out = run_cli("dataset", "ingest", ds, str(traffic), "--map", "input=msg", "--map", "output=intent",
                  "--map", "group=account")
    assert out.returncode == 0, out.stderr
    assert "200 new" in out.stdout
    again = run_cli("dataset", "ingest", ds, str(traffic), "--map", "input=msg", "--map", "output=intent",
                    "--map", "group=account")
    assert "0 new, 200 already present" in again.stdout  # re-ingesting is idempotent
    out = run_cli("dataset", "build", ds, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["rows"] == 200 and info["leakage_hits"] == 0
    out = run_cli("dataset", "leakage", ds, "--strict")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_cli("dataset", "freeze", ds, "--notes", "cli run")
    assert out.returncode == 0 and "cli run" in out.stdout
    with WorkingCopy.open(ds) as wc:
        by_group: dict[str, set[str]] = {}
        for r in wc.rows():
            by_group.setdefault(r.source_group or "", set()).add(r.split or "")
        assert all(len(s) == 1 for s in by_group.values() if not s & {"excluded"})
    bad = run_cli("dataset", "ingest", ds, str(traffic), "--map", "input=nope")
    assert bad.returncode == 1 and "no column 'nope'" in bad.stderr
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("filters:\n  lenght: 3\nsplit:\n  ratios: {train: 2}\n")
    out = run_cli("dataset", "validate", str(bad_cfg))
    assert out.returncode == 1 and "2 problem(s)" in out.stderr
    assert parse_config({}).dedup.threshold == 0.8
    _ = sample  # the generation helper is exercised in test_data_review
