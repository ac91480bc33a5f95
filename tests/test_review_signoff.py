"""Who reviewed the run: the review CLI proves the reviewer's identity and is judged by the page's own code path
(``web.site.Access``); sign-offs are signed log entries; the one gate (``data.gate.judge``) refuses training and
data exports without enough of them (``REVIEWER_REQUIRED``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from _web_support import make_review_dataset
from distillgate.cli.main import main
from distillgate.data import gate, signoff
from distillgate.data.store import WorkingCopy
from distillgate.errors import PolicyDenied
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.ledger.verify import verify_db
from distillgate.policy.decision import Request
from distillgate.policy.model import load_policies
from distillgate.web.accounts import AccountStore

POLICY: dict[str, Any] = {
    "policy_id": "study", "allowed_projects": ["bank"], "allowed_outputs": ["labels"],
    "review": {"required": True, "reviewers": {"bank": ["alice", "carol", "dave", "erin"]}, "min_reviewers": 2},
}
PASSWORD = "erin-reviews-the-bank"


@pytest.fixture()
def study(tmp_path: Path) -> dict[str, Any]:
    """A built dataset of run r1 requested by alice (her teacher call is in the log), keys for carol, dave,
    mallory (not a reviewer) and a revoked one for dave; erin's account, disabled."""
    ds = make_review_dataset(tmp_path)
    db = tmp_path / "gov.db"
    policy = tmp_path / "policy.json"
    exports = (tmp_path / "exports").as_uri() + "/"
    policy.write_text(json.dumps({**POLICY, "allowed_destinations": [exports]}))
    keys = KeyStore(db)
    secrets = {user: keys.create(user)[1] for user in ("alice", "carol", "dave", "mallory")}
    revoked_id, secrets["revoked"] = keys.create("dave")
    keys.revoke(revoked_id.key_id)
    keys.close()
    accounts = AccountStore(db)
    accounts.add("erin", PASSWORD)
    accounts.disable("erin")
    accounts.close()
    with Store.open(db) as store:  # alice started the run: her teacher call is its first allowed decision
        store.admit(load_policies(policy), Request(user="alice", project="bank", run="r1", output_type="labels"))
    return {"ds": ds, "db": db, "policy": policy, "keys": secrets, "tmp": tmp_path, "exports": exports}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def gov(s: dict[str, Any]) -> list[str]:
    return ["--dataset", str(s["ds"]), "--db", str(s["db"]), "--policy", str(s["policy"]), "--project", "bank",
            "--run", "r1"]


def first_row(s: dict[str, Any]) -> tuple[str, int]:
    with WorkingCopy.open(s["ds"]) as wc:
        row = wc.rows()[1]
        return row.row_id, row.version


def events(s: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    with Store.open(s["db"]) as store:
        return [e.body for e in store.entries(kind=kind)]


def test_cli_refuses_non_reviewer_requester_disabled_account_and_revoked_key(
        study: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    row_id, version = first_row(study)
    accept = ["review", "accept", row_id, "--row-version", str(version), *gov(study)]
    keys = study["keys"]
    monkeypatch.setenv("DISTILLGATE_REVIEWER_PASSWORD", PASSWORD)
    attempts = [
        (["--api-key", keys["mallory"]], "REVIEWER_NOT_ALLOWED", "'mallory' is not a reviewer of project 'bank'"),
        (["--api-key", keys["alice"]], "REVIEWER_NOT_ALLOWED", "'alice' cannot review their own run"),
        (["--user", "erin"], "ACCOUNT_DISABLED", "'erin' is disabled"),
        (["--api-key", keys["revoked"]], "KEY_REVOKED", "this API key was revoked"),
        (["--api-key", "dgk_forged_forged"], "AUTH_INVALID", "not known"),
        ([], "", "needs the reviewer's proof of identity"),
    ]
    for extra, code, words in attempts:
        rc, _, err = cli(capsys, *accept, *extra)
        assert rc == (2 if code else 1), (extra, err)
        assert words in err, err
    denied = events(study, "review_access")
    assert [(e["user"], e["reasons"]) for e in denied] == [
        ("mallory", ["REVIEWER_NOT_ALLOWED"]), ("alice", ["REVIEWER_NOT_ALLOWED"]), ("erin", ["ACCOUNT_DISABLED"]),
        ("dave", ["KEY_REVOKED"]), (None, ["AUTH_INVALID"])]
    assert events(study, "review") == []  # nothing refused reached the log as a review
    with WorkingCopy.open(study["ds"]) as wc:
        assert wc.get(row_id).review_state == "unreviewed"
    # there is no --reviewer to claim a name any more
    rc, _, err = cli(capsys, *accept, "--reviewer", "carol")
    assert rc == 1 and "--reviewer" in err
    # a listed reviewer with her own key: accepted, and the review names her
    rc, _out, err = cli(capsys, *accept, "--api-key", keys["carol"])
    assert rc == 0, err
    (review,) = events(study, "review")
    assert review["reviewer"] == "carol" and review["run"] == "r1" and review["project"] == "bank"


def test_sign_off_is_signed_and_gates_training_and_export(study: dict[str, Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    keys, policies = study["keys"], load_policies(study["policy"])

    def judge(kind: str, **kw: Any) -> Any:
        with Store.open(study["db"]) as store:
            with WorkingCopy.open(study["ds"]) as wc:
                head = (wc.root / "HEAD").read_text().strip() if (wc.root / "HEAD").exists() else None
            return gate.judge(store, policies, kind=kind, user="alice", project="bank", run="r1",
                              version_id=head, **kw)

    with pytest.raises(PolicyDenied) as refused:
        judge("train")
    assert refused.value.reasons == ["REVIEWER_REQUIRED"] and "signed off by nobody" in str(refused.value)
    # the requester cannot sign off her own run
    rc, _, err = cli(capsys, "review", "sign-off", *gov(study), "--api-key", keys["alice"])
    assert rc == 2 and "cannot review their own run" in err
    rc, out, err = cli(capsys, "review", "sign-off", *gov(study), "--api-key", keys["carol"])
    assert rc == 0 and "signed off version" in out, err
    # one reviewer (twice) is not two
    rc, out, _ = cli(capsys, "review", "sign-off", *gov(study), "--api-key", keys["carol"])
    assert rc == 0
    with pytest.raises(PolicyDenied, match="signed off by carol"):
        judge("export", artifact="dataset", destination=study["exports"] + "x/")
    rc, out, err = cli(capsys, "review", "sign-off", *gov(study), "--api-key", keys["dave"])
    assert rc == 0, err
    allowed = judge("train")
    assert allowed.decision.allowed and allowed.entry.body["extra"]["signed_off_by"] == ["carol", "dave"]
    # the sign-off names reviewer, version and what was reviewed, signed by the store's key
    signed = events(study, "signoff")
    assert [s["reviewer"] for s in signed] == ["carol", "carol", "dave"]
    assert len({s["version_id"] for s in signed}) == 1 and signed[0]["method"] == "api_key"
    assert signed[0]["reviewed"]["queues_left"] and "unreviewed" in signed[0]["reviewed"]["verdicts"]
    with Store.open(study["db"]) as store:
        pem = store.signer.public_key_pem()
        assert signoff.verify(signed[0], pem)
        assert not signoff.verify({**signed[0], "reviewer": "mallory"}, pem)  # an edited entry does not verify
        assert store.checkpoints()[-1].tree_size == store.size() - 1  # checkpointed right after (+ the decision)
    # the destination still counts: a signed-off run cannot go anywhere
    with pytest.raises(PolicyDenied) as elsewhere:
        judge("export", artifact="dataset", destination="file:///home/someone/")
    assert elsewhere.value.reasons == ["DESTINATION_NOT_APPROVED"]
    decisions = events(study, "decision")
    assert [d["decision"] for d in decisions[1:]] == ["deny", "deny", "allow", "deny"]
    assert verify_db(study["db"]).ok


def test_sign_off_waits_for_the_queues_the_policy_names(study: dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    doc = {**json.loads(study["policy"].read_text()), "review": {**POLICY["review"], "empty_queues": ["disagreement"]}}
    study["policy"].write_text(json.dumps(doc))
    rc, _, err = cli(capsys, "review", "sign-off", *gov(study), "--api-key", study["keys"]["carol"])
    assert rc == 2 and "still hold rows: disagreement" in err
    (denied,) = events(study, "review_access")
    assert denied["reasons"] == ["QUEUES_NOT_EMPTY"] and denied["queues"]["disagreement"] > 0
    assert events(study, "signoff") == []
    with WorkingCopy.open(study["ds"]) as wc:
        assert not (wc.root / "HEAD").exists()  # nothing was frozen for a refused sign-off


def test_audit_trace_reports_rows_without_a_signed_decision(study: dict[str, Any],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A student whose rows carry no real stamp (imported answers with a made-up one) traces to nothing: every row
    is reported, and so is the missing sign-off; exit 2."""
    from _train_support import freeze_rows, toy_rows
    from distillgate.data.guard import training_input
    from distillgate.data.versions import open_version

    made_up = [{**r, "stamp": {"decision_id": f"d-{i}", "signature": "sig"}} for i, r in enumerate(toy_rows(5))]
    version = open_version(freeze_rows(study["tmp"], made_up, name="toy"))
    rows = training_input(version.path).rows
    assert len(rows) == 5
    student = study["tmp"] / "student"
    student.mkdir()
    (student / "run.json").write_text(json.dumps({
        "dataset": {"version_dir": str(version.path), "dataset_version": version.version_id},
        "config": {"splits": ["train"]}, "provenance": {"project": "bank", "run": "r1"}}))
    rc, out, _ = cli(capsys, "audit", "trace", str(student), "--db", str(study["db"]))
    assert rc == 2
    assert f"rows without a signed decision: {len(rows)}" in out and "no sign-off of this version" in out
    assert "stamp lacks" in out


def test_a_student_checkpoint_leaves_only_signed_off_and_to_an_approved_place(
        study: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    student = study["tmp"] / "train"
    (student / "model").mkdir(parents=True)
    (student / "model" / "config.json").write_text("{}")
    with WorkingCopy.open(study["ds"]) as wc:
        from distillgate.data.versions import freeze

        version = freeze(wc)
    (student / "run.json").write_text(json.dumps({"dataset": {"dataset_version": version.version_id},
                                                  "provenance": {"project": "bank", "run": "r1"}}))
    allowed = study["exports"] + "student/"
    export = ["train", "export", str(student), "--db", str(study["db"]), "--policy", str(study["policy"]),
              "--user", "alice"]
    rc, _, err = cli(capsys, *export, "--to", allowed)
    assert rc == 2 and "REVIEWER_REQUIRED" in err
    for who in ("carol", "dave"):
        assert cli(capsys, "review", "sign-off", *gov(study), "--api-key", study["keys"][who])[0] == 0
    rc, _, err = cli(capsys, *export, "--to", (study["tmp"] / "anywhere").as_uri() + "/")
    assert rc == 2 and "DESTINATION_NOT_APPROVED" in err
    rc, out, err = cli(capsys, *export, "--to", allowed)
    assert rc == 0 and "exported 2 files" in out, err
    assert Path(allowed.removeprefix("file://"), "model", "config.json").exists()
    (event,) = events(study, "export")
    assert event["artifact"] == "student" and set(event["files"]) == {"run.json", "model/config.json"}
    outcomes = [(d["extra"]["artifact"], d["decision"], d["reasons"][-1]) for d in events(study, "decision")[1:]]
    assert outcomes == [("student", "deny", "REVIEWER_REQUIRED"), ("student", "deny", "DESTINATION_NOT_APPROVED"),
                        ("student", "allow", "ALLOWED")]


def test_forged_stale_and_unlisted_sign_offs_do_not_count(study: dict[str, Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from distillgate.data.versions import open_version

    keys, policies = study["keys"], load_policies(study["policy"])
    for who in ("carol", "dave"):
        assert cli(capsys, "review", "sign-off", *gov(study), "--api-key", keys[who])[0] == 0
    version = open_version(study["ds"])
    with Store.open(study["db"]) as store:
        # an entry that claims a sign-off without the store's signature, and a signed one by a non-reviewer
        store.append_event("signoff", {"reviewer": "erin", "user": "erin", "project": "bank", "run": "r1",
                                       "version_id": version.version_id, "signature": "forged",
                                       "signed_keys": ["reviewer"]})
        signoff.record(store, policies.select("bank"), reviewer="mallory", method="api_key", credential_id=None,
                       project="bank", run="r1", version=version, summary={})
        assert signoff.signers(store, project="bank", run="r1", version_id=version.version_id) == (
            "carol", "dave", "mallory")  # erin's entry does not verify
        admission = gate.judge(store, policies, kind="train", user="alice", project="bank", run="r1",
                               version_id=version.version_id)
        assert admission.decision.allowed
    # a reviewer's later correction makes a new version: the old sign-offs do not cover it
    with WorkingCopy.open(study["ds"]) as wc:
        row = next(r for r in wc.rows() if r.review_state == "unreviewed" and r.teacher_label)
    rc, _, err = cli(capsys, "review", "accept", row.row_id, "--row-version", str(row.version), *gov(study),
                     "--api-key", keys["carol"])
    assert rc == 0, err
    rc, out, _ = cli(capsys, "review", "sign-off", *gov(study), "--api-key", keys["carol"])
    new = open_version(study["ds"])
    assert rc == 0 and new.version_id != version.version_id and new.version_id[:16] in out
    with Store.open(study["db"]) as store:
        # mallory's properly signed entry counts for nothing: she is not a reviewer of the project
        signoff.record(store, policies.select("bank"), reviewer="mallory", method="api_key", credential_id=None,
                       project="bank", run="r1", version=new, summary={})
        with pytest.raises(PolicyDenied) as refused:
            gate.judge(store, policies, kind="train", user="alice", project="bank", run="r1",
                       version_id=new.version_id)
    assert refused.value.reasons == ["REVIEWER_REQUIRED"]
    assert "signed off by carol (" in str(refused.value)


def test_train_run_with_a_policy_needs_the_sign_off_and_records_it(study: dict[str, Any],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from _train_support import freeze_rows, save_model, toy_rows
    from distillgate.data.versions import open_version

    tmp = study["tmp"]
    save_model(tmp / "student-init", seed=2)
    dataset = freeze_rows(tmp, toy_rows(8), name="toy")
    (tmp / "train.yaml").write_text(yaml.safe_dump({
        "recipe": "sft", "dataset": str(dataset), "output_dir": str(tmp / "out"), "max_steps": 1,
        "student": {"model": {"path": str(tmp / "student-init")}}, "threads": 1}))
    governed = ["train", "run", str(tmp / "train.yaml"), "--policy", str(study["policy"]), "--db",
                str(study["db"]), "--project", "bank", "--run", "r1", "--user", "alice"]
    rc, _, err = cli(capsys, *governed)
    assert rc == 2 and "REVIEWER_REQUIRED" in err and not (tmp / "out" / "model").exists()
    rc, _, err = cli(capsys, *governed[:5])
    assert rc == 1 and "--policy needs --db" in err
    version = open_version(dataset)
    with Store.open(study["db"]) as store:
        for who in ("carol", "dave"):
            signoff.record(store, load_policies(study["policy"]).select("bank"), reviewer=who, method="api_key",
                           credential_id=None, project="bank", run="r1", version=version, summary={})
    rc, _, err = cli(capsys, *governed)
    assert rc == 0, err
    card = json.loads((tmp / "out" / "run.json").read_text())["provenance"]
    assert card["dataset_version"] == version.version_id and card["checkpoint"]["signature"]
    assert [s["reviewer"] for s in card["signoffs"]] == ["carol", "dave"]
