from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import boto3
import orjson
import pyarrow.parquet as pq
import pytest

from distillgate.destinations import read_file
from distillgate.errors import DestinationError, PolicyDenied
from distillgate.ledger import Store
from distillgate.ledger.export import export_run
from distillgate.ledger.merkle import verify_inclusion
from distillgate.ledger.signing import verify_json
from distillgate.policy import PolicySet, policy_from_data

from _foundation_support import SEED, request


def policies(tmp_path: Path) -> PolicySet:
    return PolicySet([policy_from_data({**SEED, "allowed_destinations": [(tmp_path / "exports").as_uri() + "/"]})])


def fill(store: Store, ps: PolicySet) -> None:
    for i in range(12):
        a = store.admit(ps, request(run="run-A" if i % 2 else "run-B"))
        if a.reservation_id:
            store.settle(a.reservation_id, prompt_tokens=4, completion_tokens=6, response_hash="r" * 64)
    store.admit(ps, request(run="run-A", output_type="mystery"))  # a denial belongs to the run too
    # a run belongs to one project: another project's use of the id is refused, and is not part of its export
    refused = store.admit(ps, request(run="run-A", project="moonshot"))
    assert "RUN_OWNED_BY_OTHER_PROJECT" in refused.decision.reasons


def check_bundle(files: dict[str, bytes]) -> dict[str, object]:
    manifest = orjson.loads(files["manifest.json"])
    for name in ("decisions.jsonl", "decisions.parquet", "checkpoint.json"):
        assert manifest["files"][name]["sha256"] == hashlib.sha256(files[name]).hexdigest()
    lines = [orjson.loads(x) for x in files["decisions.jsonl"].splitlines()]
    assert {x["run"] for x in lines} == {"run-A"} and len(lines) == manifest["entries"] == 13
    table = pq.read_table(io.BytesIO(files["decisions.parquet"]))
    assert table.num_rows == 13 and table.column("entry_hash").to_pylist() == [x["entry_hash"] for x in lines]
    cp = orjson.loads(files["checkpoint.json"])
    pem = manifest["public_key_pem"]
    assert verify_json(pem, {k: cp["checkpoint"][k] for k in ("tree_size", "root_hash", "ts", "key_id")},
                       cp["checkpoint"]["signature"])
    for x in lines:
        proof = cp["inclusion_proofs"][str(x["index"])]
        assert verify_inclusion(x["entry_hash"], x["index"], cp["checkpoint"]["tree_size"], proof,
                                cp["checkpoint"]["root_hash"])
    assert manifest["decisions"] == {"allow": 6, "deny": 1}
    assert manifest["tokens_charged"] == 60 and "OUTPUT_TYPE_NOT_ALLOWED" in manifest["reason_counts"]
    assert manifest["project"] == "internal-compression" and manifest["projects"] == ["internal-compression"]
    return manifest


def test_export_to_file_writes_verifiable_bundle(tmp_path: Path) -> None:
    ps = policies(tmp_path)
    with Store.open(tmp_path / "s.db") as store:
        fill(store, ps)
        dest = (tmp_path / "exports" / "run-A").as_uri() + "/"
        result = export_run(store, ps, "run-A", dest, user="alice")
        files = {Path(u).name: read_file(u) for u in result.urls}
        check_bundle(files)
        events = [e.body for e in store.entries(kind="export")]
        assert events and events[0]["destination"] == dest


def test_export_outside_allowed_destinations_is_refused_and_logged(tmp_path: Path) -> None:
    ps = policies(tmp_path)
    with Store.open(tmp_path / "s.db") as store:
        fill(store, ps)
        with pytest.raises(PolicyDenied) as info:
            export_run(store, ps, "run-A", (tmp_path / "elsewhere").as_uri() + "/", user="alice")
        assert info.value.reasons == ["DESTINATION_NOT_APPROVED"]
        denied = [e.body for e in store.entries(kind="decision") if e.body["request_kind"] == "export"]
        assert denied[-1]["decision"] == "deny" and denied[-1]["reasons"] == ["DESTINATION_NOT_APPROVED"]
    assert not (tmp_path / "elsewhere").exists()


def test_export_to_s3_on_a_real_server(tmp_path: Path, s3_server: str) -> None:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="ai-governance")
    ps = policies(tmp_path)
    with Store.open(tmp_path / "s.db") as store:
        fill(store, ps)
        result = export_run(store, ps, "run-A", "s3://ai-governance/distillation/run-A/", user="alice")
    assert all(u.startswith("s3://ai-governance/distillation/run-A/") for u in result.urls)
    client = boto3.client("s3", endpoint_url=s3_server)
    listed = client.list_objects_v2(Bucket="ai-governance", Prefix="distillation/run-A/")
    names = sorted(o["Key"].rsplit("/", 1)[1] for o in listed["Contents"])
    assert names == ["checkpoint.json", "decisions.jsonl", "decisions.parquet", "manifest.json"]
    files = {n: client.get_object(Bucket="ai-governance", Key=f"distillation/run-A/{n}")["Body"].read()
             for n in names}
    manifest = check_bundle(files)
    assert json.loads(files["manifest.json"])["run"] == manifest["run"] == "run-A"


def test_s3_failure_is_a_clear_error(tmp_path: Path, s3_server: str) -> None:
    ps = PolicySet([policy_from_data({**SEED, "allowed_destinations": ["s3://no-such-bucket-here/"]})])
    with Store.open(tmp_path / "s.db") as store:
        fill(store, ps)
        with pytest.raises(DestinationError, match="bucket"):
            export_run(store, ps, "run-A", "s3://no-such-bucket-here/x/", user="alice")
