"""Signing in to the review site with a reviewer account and password, over real HTTP (uvicorn on loopback):
the policy judges password accounts as it judges key users, failures are logged without the secret and lock the
name after five in a row, and a disabled account's sessions end."""

from __future__ import annotations

import html
from pathlib import Path

import orjson
import pytest

from _web_support import PASSWORDS, POLICY, FakeClock, csrf_of, live_site
from distillgate.ledger.store import Store
from distillgate.policy.model import PolicySet, policy_from_data
from distillgate.web.accounts import LOCKOUT_S, MAX_FAILURES, AccountStore

PASSWORD = PASSWORDS["alice"]


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def _all_log_text(db: Path) -> str:
    with Store.open(db) as store:
        return "\n".join(orjson.dumps(e.body).decode() for e in store.entries())


def test_a_reviewer_signs_in_with_a_password(tmp_path: Path) -> None:
    with live_site(tmp_path) as live, live.client() as client:
        login = client.get("/login").text
        assert 'id="user"' in login and 'id="password"' in login and 'id="api_key"' in login
        reply = live.try_password(client, "alice", PASSWORD)
        assert reply.status_code == 303 and reply.headers["location"] == "/"
        home = client.get("/")
        assert home.status_code == 200 and "signed in as <strong>alice</strong>" in home.text
        assert "Dataset bank-intents" in home.text
        (event,) = live.events("review_signin")
        assert {k: event[k] for k in ("user", "method", "outcome", "project", "run")} == {
            "user": "alice", "method": "password", "outcome": "ok", "project": "bank", "run": "run-7"}


def test_wrong_passwords_are_refused_logged_without_the_secret(tmp_path: Path) -> None:
    with live_site(tmp_path) as live, live.client() as client:
        wrong = live.try_password(client, "alice", "not-alices-password")
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
        assert 'value="alice"' in wrong.text  # the name is kept, the password is not
        assert "not-alices-password" not in wrong.text
        unknown = live.try_password(client, "nobody", PASSWORD)
        assert unknown.status_code == 401 and "wrong user name or password" in unknown.text  # same words
        assert client.get("/").status_code == 303  # not signed in
        events = live.events("review_signin")
        assert [(e["user"], e["method"], e["outcome"], e["failures"]) for e in events] == [
            ("alice", "password", "wrong_password", 1), ("nobody", "password", "unknown_user", 1)]
        bad_key = client.post("/login", data={"csrf": csrf_of(wrong.text), "api_key": "dgk_nope_nope"})
        assert bad_key.status_code == 401
        assert live.events("review_signin")[-1]["outcome"] == "invalid_key"
        log = _all_log_text(live.site.db)
        assert "not-alices-password" not in log and PASSWORD not in log and "dgk_nope_nope" not in log


def test_five_failures_lock_the_user_for_a_minute(tmp_path: Path, clock: FakeClock) -> None:
    with live_site(tmp_path, clock=clock) as live, live.client() as client:
        replies = [live.try_password(client, "alice", f"guess number {i}") for i in range(MAX_FAILURES)]
        assert [r.status_code for r in replies] == [401, 401, 401, 401, 429]
        assert "too many failed sign-ins for &#39;alice&#39;: sign-in is locked for 60 s" in replies[-1].text
        clock.advance(20)
        locked = live.try_password(client, "alice", PASSWORD)  # even the right password waits
        assert locked.status_code == 429 and "locked for 40 s" in locked.text
        assert client.get("/").status_code == 303
        events = live.events("review_signin")
        assert [e["outcome"] for e in events] == ["wrong_password"] * MAX_FAILURES + ["locked"]
        assert events[MAX_FAILURES - 1]["locked_for_s"] == LOCKOUT_S
        # other reviewers are not locked out; alice is once the minute is over
        other = live.client()
        store = AccountStore(live.site.db)
        try:
            store.add("bob", "bob-also-reviews-bank")
        finally:
            store.close()
        assert live.try_password(other, "bob", "bob-also-reviews-bank").status_code == 303
        clock.advance(LOCKOUT_S - 20 + 1)
        assert live.try_password(client, "alice", PASSWORD).status_code == 303
        assert client.get("/").status_code == 200


def test_the_policy_judges_password_accounts_like_key_users(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        store = AccountStore(live.site.db)
        try:
            store.add("mallory", "mallory-reviews-other")  # policy: mallory reviews project "other" only
            store.add("carol", "carol-is-not-listed")
        finally:
            store.close()
        for user, password in (("mallory", "mallory-reviews-other"), ("carol", "carol-is-not-listed")):
            with live.client() as client:
                reply = live.try_password(client, user, password)
                assert reply.status_code == 403
                assert f"{user!r} is not a reviewer of project 'bank'" in html.unescape(reply.text)
                assert client.get("/rows/ds-traffic-0%3A0").status_code == 303
        denied = live.events("review_access")
        assert [(e["user"], e["reasons"]) for e in denied] == [
            ("mallory", ["REVIEWER_NOT_ALLOWED"]), ("carol", ["REVIEWER_NOT_ALLOWED"])]
        assert [e["outcome"] for e in live.events("review_signin")] == ["not_allowed", "not_allowed"]
        # and on every page: alice signed in with her password, then the policy drops her
        alice = live.client()
        assert live.try_password(alice, "alice", PASSWORD).status_code == 303
        assert alice.get("/").status_code == 200
        narrowed = {**POLICY, "review": {"reviewers": {"bank": ["bob"]}}}
        object.__setattr__(live.site, "policies", PolicySet([policy_from_data(narrowed)]))
        page = alice.get("/rows/ds-traffic-1%3A0")
        assert page.status_code == 403 and "My top up did not go through" not in page.text


def test_disabling_an_account_ends_its_sessions(tmp_path: Path) -> None:
    with live_site(tmp_path) as live, live.client() as client:
        assert live.try_password(client, "alice", PASSWORD).status_code == 303
        assert client.get("/").status_code == 200
        store = AccountStore(live.site.db)
        try:
            store.disable("alice")
        finally:
            store.close()
        reply = client.get("/")
        assert reply.status_code == 303 and reply.headers["location"] == "/login"
        again = live.try_password(client, "alice", PASSWORD)
        assert again.status_code == 403 and "account &#39;alice&#39; is disabled" in again.text
        assert live.events("review_signin")[-1]["outcome"] == "disabled"
        # alice's API key still works: the key and the account are separate credentials
        assert live.sign_in("alice").get("/").status_code == 200


def test_a_new_password_ends_open_sessions_and_enabling_restores_the_account(tmp_path: Path) -> None:
    new_password = "a much better passphrase"
    with live_site(tmp_path) as live, live.client() as old_session, live.client() as other:
        assert live.try_password(old_session, "alice", PASSWORD).status_code == 303
        assert old_session.get("/").status_code == 200
        store = AccountStore(live.site.db)
        try:
            store.set_password("alice", new_password)
            reply = old_session.get("/")
            assert reply.status_code == 303 and reply.headers["location"] == "/login"  # the old session ended
            assert live.try_password(other, "alice", PASSWORD).status_code == 401  # the old password is gone
            assert live.try_password(other, "alice", new_password).status_code == 303
            assert other.get("/").status_code == 200
            store.disable("alice")
            assert other.get("/").status_code == 303
            store.enable("alice")
            assert live.try_password(other, "alice", new_password).status_code == 303
            assert other.get("/").status_code == 200
        finally:
            store.close()
