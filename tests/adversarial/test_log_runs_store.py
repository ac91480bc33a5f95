"""Run ownership at the store: two writers on one file, and a log written before runs had owners."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from distillgate.ledger import Store
from distillgate.policy import PolicySet, Request, policy_from_data

STRICT = {"policy_id": "strict", "allowed_projects": ["strict"], "allowed_outputs": ["labels"]}
LOOSE = {"policy_id": "loose", "allowed_projects": ["loose"], "allowed_outputs": ["labels"]}


def ask(store: Store, policies: PolicySet, project: str, run: str) -> tuple[str, ...]:
    request = Request(user="u", project=project, run=run, output_type="labels", model="m", max_tokens=1)
    return store.admit(policies, request).decision.reasons


def test_two_writers_on_one_file_agree_on_the_owner(tmp_path: Path) -> None:
    policies = PolicySet([policy_from_data(STRICT), policy_from_data(LOOSE)])
    db = tmp_path / "s.db"
    with Store.open(db) as a, Store.open(db) as b:
        assert ask(a, policies, "strict", "r") == ("ALLOWED",)
        assert ask(b, policies, "loose", "r") == ("RUN_OWNED_BY_OTHER_PROJECT",)  # b's cache saw a's commit
        assert ask(b, policies, "strict", "r") == ("ALLOWED",)
        assert a.run_owner("r") == b.run_owner("r") == "strict"


def test_a_log_from_before_run_owners_is_backfilled_on_open(tmp_path: Path) -> None:
    policies = PolicySet([policy_from_data(STRICT), policy_from_data(LOOSE)])
    db = tmp_path / "s.db"
    with Store.open(db) as store:
        ask(store, policies, "nowhere", "x")  # denied: a denial never claims a run
        ask(store, policies, "strict", "x")
        ask(store, policies, "loose", "y")
    conn = sqlite3.connect(db)
    with conn:
        # what a store written by an older distillgate looks like: no runs table, no recorded migrations
        conn.execute("DROP TABLE runs")
        conn.execute("DROP TABLE distillgate_migrations")
    conn.close()
    with Store.open(db) as store:
        assert store.run_owner("x") == "strict" and store.run_owner("y") == "loose"
        assert ask(store, policies, "loose", "x") == ("RUN_OWNED_BY_OTHER_PROJECT",)
