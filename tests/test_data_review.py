"""Generation I/O (exactly-once append), review operations with optimistic concurrency, and the review CLI."""

from __future__ import annotations

import json
import threading

import pytest

from _data_support import make_dataset, sample, teacher_answer
from distillgate.data import review
from distillgate.data.pipeline import build
from distillgate.data.store import WorkingCopy, append_generated
from distillgate.data.versions import freeze
from distillgate.errors import ConflictError, DatasetGuardError, NotFoundError, UserError

from conftest import run_cli

RECORDS = [
    {"id": str(i), "text": t, "answer": teacher_answer(lbl)}
    for i, (t, lbl) in enumerate([
        ("Where is my new card?", "card_arrival"),
        ("My top up did not go through", "top_up_failed"),
        ("What exchange rate do you use?", "exchange_rate"),
        ("I think someone stole my card", "lost_or_stolen_card"),
        ("Can I get a refund for this purchase?", "request_refund"),
        ("The app shows a payment I did not make", "card_payment_not_recognised"),
    ])
]


def test_append_generated_is_exactly_once(tmp_path):
    wc = make_dataset(tmp_path, [])
    traffic = tmp_path / "t.jsonl"
    traffic.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in RECORDS))
    from distillgate.data.ingest import ingest_file

    wc.add_inputs(ingest_file(traffic).rows)
    todo = wc.pending_generation(k=2)
    assert len(todo) == 12
    first = [sample(t.input_id, i, teacher_answer("card_arrival")) for t, i in todo[:5]]
    assert wc.append_generated(first).added == 5
    again = wc.append_generated(first)  # a rerun re-sending stored samples is a no-op
    assert (again.added, again.already_present) == (0, 5)
    assert len(wc.pending_generation(k=2)) == 7
    result = append_generated(wc.root, [sample(t.input_id, i, "x") for t, i in wc.pending_generation(k=2)])
    assert result.added == 7 and wc.count_rows() == 12 and wc.pending_generation(k=2) == []
    row = wc.get("t-0:1")
    assert row.stamp == {"decision_id": "d-t-0-1", "signature": "sig", "key_id": "k1"}
    assert row.teacher_card["parameter_count"] == 134515008 and row.prompt_template_id == "intent-v1"
    with pytest.raises(NotFoundError, match="never ingested"):
        wc.append_generated([sample("t-0", 5, "x"), sample("nope", 0, "x")])
    assert wc.count_rows() == 12  # the whole batch was rolled back


def test_correct_keeps_teacher_answer_and_survives_rebuild(tmp_path):
    wc = make_dataset(tmp_path, RECORDS)
    build(wc)
    row = wc.get("ds-traffic-2:0")
    verdict = review.correct(wc, row.row_id, "alice", row.version, "exchange_rate_fees", "asks about fees")
    stored = wc.get(row.row_id)
    assert stored.label == "exchange_rate_fees" and stored.teacher_label == "exchange_rate"
    assert stored.output_raw == row.output_raw and stored.edited is True
    assert stored.reviewer == "alice" and stored.review_reason == "asks about fees"
    assert stored.review_before["label"] == "exchange_rate" and stored.review_after["label"] == "exchange_rate_fees"
    assert verdict.row.version == row.version + 1
    build(wc)
    assert wc.get(row.row_id).label == "exchange_rate_fees"


def test_stale_version_is_refused(tmp_path):
    wc = make_dataset(tmp_path, RECORDS)
    build(wc)
    row = wc.get("ds-traffic-0:0")
    review.accept(wc, row.row_id, "alice", row.version)
    with pytest.raises(ConflictError, match="changed since you read it"):
        review.reject(wc, row.row_id, "bob", row.version, "spam")
    assert wc.get(row.row_id).review_state == "accepted"


def test_concurrent_reviewers_only_one_wins(tmp_path):
    wc = make_dataset(tmp_path, RECORDS)
    build(wc)
    row = wc.get("ds-traffic-1:0")
    outcomes: list[str] = []

    def act(name: str) -> None:
        with WorkingCopy.open(wc.root) as own:
            try:
                review.correct(own, row.row_id, name, row.version, f"label_{name}", "because")
                outcomes.append("ok")
            except ConflictError:
                outcomes.append("conflict")

    threads = [threading.Thread(target=act, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "ok"]


def test_queues_reject_and_accept_override(tmp_path):
    records = [*RECORDS, {"id": "9", "text": "Help me with a thing", "answer": "Some free text, not JSON at all"}]
    wc = make_dataset(tmp_path, records, {"filters": {"valid_json": True}, "review": {"rare_label_max_count": 1}})
    build(wc)
    sizes = review.queue_sizes(wc)
    assert sizes["failed_parse"] == 1 and sizes["reason:INVALID_JSON:<none>"] == 1
    assert sizes["rare_labels"] == 6
    bad = review.next_row(wc, "failed_parse", "alice")
    assert bad is not None and bad.input_id == "ds-traffic-9"
    review.correct(wc, bad.row_id, "alice", bad.version, "other", "free text but clear intent")
    build(wc)
    assert wc.get(bad.row_id).filter_status == "pass"  # a human vouched for the answer
    assert review.next_row(wc, "failed_parse", "alice") is None
    row = wc.get("ds-traffic-0:0")
    review.reject(wc, row.row_id, "bob", row.version, "not a banking question")
    build(wc)
    rejected = wc.get(row.row_id)
    assert rejected.split == "excluded" and "REVIEW_REJECTED" in rejected.filter_reasons
    with pytest.raises(NotFoundError, match="no review queue"):
        review.queue_rows(wc, "nonsense")
    with pytest.raises(UserError, match="reviewer"):
        review.accept(wc, "ds-traffic-3:0", " ", 1)


def test_golden_rows_are_locked_after_freeze(tmp_path):
    wc = make_dataset(tmp_path, RECORDS, {"split": {"golden": {"fraction": 0.5}, "holdout": {"enabled": False}}})
    build(wc)
    freeze(wc)
    golden = [r for r in wc.rows() if r.split == "golden"]
    assert golden
    with pytest.raises(DatasetGuardError, match="hash-locked"):
        review.correct(wc, golden[0].row_id, "alice", golden[0].version, "x", "y")


def test_review_cli_flow(tmp_path):
    from distillgate.keys import KeyStore

    wc = make_dataset(tmp_path, RECORDS, {"review": {"rare_label_max_count": 1}})
    build(wc)
    ds = str(wc.root)
    out = run_cli("review", "queues", "--dataset", ds)
    assert out.returncode == 0 and "rare_labels" in out.stdout
    nxt = run_cli("review", "next", "rare_labels", "--dataset", ds, "--reviewer", "carol", "--json")
    assert nxt.returncode == 0, nxt.stderr
    shown = json.loads(nxt.stdout)
    rid, ver = shown["row_id"], str(shown["version"])
    db = str(tmp_path / "log.db")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"policy_id": "p", "allowed_projects": ["internal-compression"],
                                  "allowed_outputs": ["labels"],
                                  "review": {"reviewers": {"internal-compression": ["carol", "dan"]}}}))
    keys = KeyStore(db)
    carol, dan = keys.create("carol")[1], keys.create("dan")[1]
    keys.close()
    gov = ["--db", db, "--policy", str(policy), "--project", "internal-compression", "--run", "r7"]
    ok = run_cli("review", "correct", rid, "--dataset", ds, "--row-version", ver,
                 "--label", "card_delivery_estimate", "--reason", "asks when, not where", *gov, "--api-key", carol)
    assert ok.returncode == 0, ok.stderr
    assert "card_delivery_estimate" in ok.stdout and "logged review event" in ok.stdout
    from distillgate.ledger import Store

    with Store.open(db) as store:
        events = [e.body for e in store.entries(kind="review")]
    assert len(events) == 1 and events[0]["reviewer"] == "carol" and events[0]["run"] == "r7"
    stale = run_cli("review", "accept", rid, "--dataset", ds, "--row-version", ver, *gov, "--api-key", dan)
    assert stale.returncode == 1 and "changed since you read it" in stale.stderr
    show = run_cli("review", "show", rid, "--dataset", ds)
    assert "edited: True" in show.stdout and "carol" in show.stdout


def test_build_skips_rows_a_reviewer_changed_meanwhile(tmp_path):
    from distillgate.data.pipeline import process

    wc = make_dataset(tmp_path, RECORDS)
    build(wc)
    rows = wc.rows()
    read_versions = {r.row_id: r.version for r in rows}
    process(rows, wc.config)  # a build in progress ...
    target = wc.get("ds-traffic-4:0")
    review.correct(wc, target.row_id, "alice", target.version, "refund_not_showing_up", "meanwhile")
    rows[4].split = "test"  # ... that would overwrite the reviewer's row
    rows[5].split = "test"
    changed, conflicts = wc.save_build(rows, read_versions)
    assert conflicts == [target.row_id]
    assert wc.get(target.row_id).label == "refund_not_showing_up"
    assert changed >= 1 and wc.get(rows[5].row_id).split == "test"


_WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from _data_support import sample, teacher_answer
from distillgate.data.store import WorkingCopy
wc = WorkingCopy.open({ds!r})
for template, index in wc.pending_generation(k=2):
    wc.append_generated([sample(template.input_id, index, teacher_answer("card_arrival"))])
    print("stored", template.input_id, index, flush=True)
    time.sleep(0.02)
"""


def test_append_survives_sigkill_and_resumes_exactly_once(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    records = [{"id": str(i), "text": f"question number {i} about my card"} for i in range(60)]
    wc = make_dataset(tmp_path, [])
    traffic = tmp_path / "t.jsonl"
    traffic.write_text("".join(json.dumps(r) + "\n" for r in records))
    from distillgate.data.config import IngestConfig
    from distillgate.data.ingest import ingest_file

    wc.add_inputs(ingest_file(traffic, IngestConfig.model_validate({"columns": {"record_id": "id"}})).rows)
    script = _WRITER.format(tests=str(Path(__file__).parent), ds=str(wc.root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(15):  # let it store some samples, then kill it mid-run
        assert proc.stdout.readline().startswith("stored")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = wc.count_rows()
    assert 15 <= stored < 120
    rerun = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.count("stored") == 120 - stored  # only the missing samples were generated again
    ids = [r.row_id for r in wc.rows()]
    assert len(ids) == len(set(ids)) == 120
