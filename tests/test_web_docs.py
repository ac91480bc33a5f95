"""docs/review-web.md cannot drift: every serve option, route, keyboard shortcut and event field is documented."""

from __future__ import annotations

import re
from pathlib import Path

from distillgate.cli.review_serve import serve
from distillgate.data.review import Verdict, review_event
from distillgate.data.schema import Row
from distillgate.web.app import ACTIONS, HERE, create_app
from distillgate.web.site import ReviewSite

DOC = (Path(__file__).resolve().parent.parent / "docs" / "review-web.md").read_text()


def test_every_serve_option_is_documented() -> None:
    for param in serve.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert f"`{opt}" in DOC, opt


def test_every_route_and_action_is_documented(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from _web_support import make_site

    site, _ = make_site(tmp_path)
    app = create_app(site)
    with TestClient(app) as client:  # runs the lifespan, which closes the key store and log
        assert client.get("/favicon.svg").status_code == 200
    skip = {"/static", "/favicon.svg", "/rows/{row_id:str}/{action:str}"}
    paths = {getattr(r, "path", "") for r in app.routes} - skip
    for path in paths:
        assert re.sub(r":str}", "}", path) in DOC, path
    for action in ACTIONS:
        assert f"/rows/{{row_id}}/{action}" in DOC, action
    assert isinstance(site, ReviewSite)


def test_every_keyboard_shortcut_is_documented() -> None:
    script = (HERE / "static" / "review.js").read_text()
    keys = set(re.findall(r'case "(\w)"', script))
    assert keys == {"a", "c", "r", "s", "o"}
    for key in keys:
        assert f"| `{key}` |" in DOC, key
    assert "`1`–`9`" in DOC


def test_every_review_event_field_is_documented() -> None:
    row = Row(row_id="i:0", input_id="i", input="x")
    for field in review_event(Verdict(row, "accept"), dataset="d", project="p", run="r"):
        if field != "user":  # the log's indexed user column, same as reviewer
            assert f"`{field}`" in DOC, field


def test_every_review_user_command_and_option_is_documented() -> None:
    from distillgate.cli.review_users import users

    for name, command in users.commands.items():
        assert f"`review user {name}" in DOC, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in DOC, (name, opt)


def test_every_sign_in_outcome_and_event_field_is_documented(tmp_path: Path) -> None:
    """Drive each sign-in outcome through ``Access`` and check its event's outcome and fields are on the page."""
    from _web_support import PASSWORDS, make_site
    from distillgate.keys import KeyStore
    from distillgate.ledger.store import Store
    from distillgate.web.accounts import MAX_FAILURES, AccountStore
    from distillgate.web.site import Access

    site, secrets = make_site(tmp_path)
    keys, accounts, log = KeyStore(site.db), AccountStore(site.db), Store.open(site.db)
    try:
        accounts.add("mallory", "mallory-reviews-other")
        access = Access(site, keys, accounts, log)
        access.sign_in_password("alice", PASSWORDS["alice"])
        access.sign_in_password("nobody", "whatever password")
        access.sign_in_password("x" * 200, "whatever password")
        access.sign_in_password("mallory", "mallory-reviews-other")
        for _ in range(MAX_FAILURES + 1):
            access.sign_in_password("alice", "not the password")
        accounts.disable("mallory")
        access.sign_in_password("mallory", "mallory-reviews-other")
        access.sign_in("dgk_nope_nope")
        (key,) = keys.list(user="bob")
        keys.revoke(key.key_id)
        access.sign_in(secrets["bob"])
        events = [e.body for e in log.entries(kind="review_signin")]
    finally:
        keys.close()
        accounts.close()
        log.close()
    outcomes = {e["outcome"] for e in events}
    assert outcomes == {"ok", "wrong_password", "unknown_user", "locked", "disabled", "bad_user_name",
                        "invalid_key", "revoked_key", "not_allowed"}
    for outcome in outcomes:
        assert f"`{outcome}`" in DOC, outcome
    generic = {"kind", "ts", "index", "prev_hash", "schema_version", "log_key"}  # log fields (log_key: entry 0)
    for field in {f for e in events for f in e} - generic:
        assert f"`{field}`" in DOC, field
