"""What the web layer added to ``distillgate.data.review``: leases, the allowed-label check, review events, and the
``review serve`` command as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from _web_support import POLICY, free_port, make_review_dataset
from distillgate.data import review
from distillgate.data.store import WorkingCopy
from distillgate.errors import ConflictError, UserError
from distillgate.keys import KeyStore
from distillgate.ledger.export import run_manifest
from distillgate.ledger.store import Store


def test_a_lease_keeps_others_off_a_row_until_it_expires(review_wc: WorkingCopy) -> None:
    lease = review.claim(review_wc, "ds-traffic-0:0", "alice", ttl_s=60, now=1000.0)
    assert (lease.reviewer, lease.expires_at) == ("alice", 1060.0)
    assert review.lease_of(review_wc, "ds-traffic-0:0", now=1059.0) == lease
    with pytest.raises(ConflictError, match="being reviewed by alice"):
        review.claim(review_wc, "ds-traffic-0:0", "bob", now=1030.0)
    renewed = review.claim(review_wc, "ds-traffic-0:0", "alice", ttl_s=60, now=1030.0)  # the holder renews
    assert renewed.expires_at == 1090.0
    assert review.lease_of(review_wc, "ds-traffic-0:0", now=1090.0) is None  # expired
    assert review.claim(review_wc, "ds-traffic-0:0", "bob", now=1091.0).reviewer == "bob"
    assert review.release(review_wc, "ds-traffic-0:0", "alice") is False  # not hers any more
    assert review.release(review_wc, "ds-traffic-0:0", "bob") is True


def test_writes_respect_leases_and_free_the_row(review_wc: WorkingCopy) -> None:
    review.claim(review_wc, "ds-traffic-1:0", "alice")
    row = review_wc.get("ds-traffic-1:0")
    with pytest.raises(ConflictError, match="being reviewed by alice"):
        review.accept(review_wc, row.row_id, "bob", row.version)
    assert review_wc.get(row.row_id).version == row.version  # nothing written
    verdict = review.accept(review_wc, row.row_id, "alice", row.version)
    assert verdict.row.review_state == "accepted"
    assert review.lease_of(review_wc, row.row_id) is None  # the write released the lease


def test_rows_where_and_release_all(review_wc: WorkingCopy) -> None:
    assert [r.row_id for r in review_wc.rows_where("input_id", "ds-traffic-3")] == ["ds-traffic-3:0", "ds-traffic-3:1"]
    assert [r.row_id for r in review_wc.rows_where("dup_cluster", "ds-traffic-3")] == [
        "ds-traffic-3:0", "ds-traffic-6:0", "ds-traffic-3:1"]
    with pytest.raises(UserError, match="no field 'nope'"):
        review_wc.rows_where("nope", 1)
    review.claim(review_wc, "ds-traffic-1:0", "alice")
    review.claim(review_wc, "ds-traffic-2:0", "alice")
    review.claim(review_wc, "ds-traffic-4:0", "bob")
    assert review.release_all(review_wc, "alice") == 2
    assert review.lease_of(review_wc, "ds-traffic-1:0") is None and review.lease_of(review_wc, "ds-traffic-4:0") is not None


def test_claim_next_hands_each_reviewer_a_different_row(review_wc: WorkingCopy) -> None:
    a = review.claim_next(review_wc, "disagreement", "alice", now=0.0)
    b = review.claim_next(review_wc, "disagreement", "bob", now=0.0)
    assert a is not None and b is not None and a.row_id != b.row_id
    assert review.claim_next(review_wc, "disagreement", "alice", now=1.0).row_id == a.row_id  # hers first
    skipped = review.claim_next(review_wc, "disagreement", "alice", now=1.0, skip=frozenset({a.row_id}))
    assert skipped is not None and skipped.row_id not in (a.row_id, b.row_id)
    rows = {r.row_id for r in review.queue_rows(review_wc, "disagreement")}
    taken = {a.row_id, b.row_id, skipped.row_id}
    for i in range(len(rows)):
        nxt = review.claim_next(review_wc, "disagreement", f"reviewer-{i}", now=2.0)
        if nxt is None:
            break
        assert nxt.row_id not in taken
        taken.add(nxt.row_id)
    assert taken == rows and review.claim_next(review_wc, "disagreement", "dave", now=2.0) is None


def test_corrections_are_limited_to_the_allowed_labels(review_wc: WorkingCopy) -> None:
    assert review.allowed_labels(review_wc, "default") == sorted(
        ["card_arrival", "top_up_failed", "exchange_rate", "lost_or_stolen_card", "request_refund",
         "card_payment_not_recognised", "refusal"])
    row = review_wc.get("ds-traffic-2:0")
    with pytest.raises(UserError, match="not an allowed label"):
        review.correct(review_wc, row.row_id, "alice", row.version, "pizza", "wrong")
    assert review.correct(review_wc, row.row_id, "alice", row.version, "card_arrival", "asks about the card").row.edited


def test_review_events_name_the_run_reviewer_for_the_run_bundle(review_wc: WorkingCopy, tmp_path: Path) -> None:
    row = review_wc.get("ds-traffic-3:0")
    verdict = review.correct(review_wc, row.row_id, "alice", row.version, "card_arrival", "card, not theft")
    with Store.open(tmp_path / "log.db") as store:
        entry = review.log_review(store, verdict, dataset="bank-intents", project="bank", run="run-7")
        assert entry.body["kind"] == "review"
        body = {k: entry.body[k] for k in ("reviewer", "row_id", "action", "before", "after", "reason", "dataset",
                                            "project", "run", "edited")}
        assert body == {
            "reviewer": "alice", "row_id": "ds-traffic-3:0", "action": "correct",
            # the answer is a JSON object naming the label, so the correction renames it there too
            "before": {"label": "lost_or_stolen_card", "review_state": "unreviewed", "filter_status": "fail",
                       "output": '{"category":"lost_or_stolen_card","explanation":"the customer asks about this"}'},
            "after": {"label": "card_arrival", "review_state": "corrected", "filter_status": "fail",
                      "output": '{"category":"card_arrival","explanation":"the customer asks about this"}'},
            "reason": "card, not theft", "dataset": "bank-intents", "project": "bank", "run": "run-7",
            "edited": True,
        }
        entries = list(store.entries(run="run-7"))
        manifest = run_manifest("run-7", entries, {}, store.signer.public_key_pem(), {})
    assert manifest["reviewers"] == ["alice"]  # "who reviewed the run?"


def test_review_serve_runs_as_a_command(tmp_path: Path) -> None:
    dataset = make_review_dataset(tmp_path)
    db = tmp_path / "review.db"
    keys = KeyStore(db)
    secret = keys.create("alice")[1]
    keys.close()
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillgate", "review", "serve", "--dataset", str(dataset), "--db", str(db),
         "--policy", str(policy), "--project", "bank", "--run", "run-9", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                login = httpx.get(url + "/login", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "review serve did not start"
                time.sleep(0.2)
        assert login.status_code == 200 and "Sign in to review" in login.text
        with httpx.Client(base_url=url) as client:
            import re

            page = client.get("/login").text
            token = re.search(r'name="csrf" value="([^"]+)"', page)
            assert token
            reply = client.post("/login", data={"csrf": token.group(1), "api_key": secret}, follow_redirects=True)
            assert reply.status_code == 200 and "Dataset bank-intents" in reply.text and "run-9" in reply.text
    finally:
        proc.terminate()
        proc.wait(20)


def test_review_serve_reports_bad_input(tmp_path: Path) -> None:
    from conftest import run_cli

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    (tmp_path / "empty").mkdir()
    result = run_cli("review", "serve", "--dataset", str(tmp_path / "empty"), "--policy", str(policy),
                     "--project", "bank", "--db", str(tmp_path / "x.db"))
    assert result.returncode == 1 and "not a dataset working copy" in result.stderr
    dataset = make_review_dataset(tmp_path)
    unknown = run_cli("review", "serve", "--dataset", str(dataset), "--policy", str(policy), "--project", "nope",
                      "--db", str(tmp_path / "x.db"))
    assert unknown.returncode == 1 and "no policy allows project 'nope'" in unknown.stderr
    assert "one of bank, other" in unknown.stderr
    helptext = run_cli("review", "serve", "--help")
    assert helptext.returncode == 0 and "--lease-ttl" in helptext.stdout
