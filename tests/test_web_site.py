"""The review site over real HTTP (uvicorn on a loopback port): sign-in, policy, CSRF, sessions, leases, conflicts."""

from __future__ import annotations

import html
from pathlib import Path

import pytest

from _web_support import POLICY, FakeClock, csrf_of, live_site, version_of
from distillgate.data import review
from distillgate.keys import KeyStore
from distillgate.policy.model import PolicySet, policy_from_data


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def test_pages_need_a_signed_in_reviewer(tmp_path: Path) -> None:
    with live_site(tmp_path) as live, live.client() as anon:
        for path in ("/", "/rows/ds-traffic-0%3A0", "/queues/disagreement/next"):
            reply = anon.get(path)
            assert reply.status_code == 303 and reply.headers["location"] == "/login"
        token = csrf_of(anon.get("/login").text)
        bad = anon.post("/login", data={"csrf": token, "api_key": "dgk_nope_nope"})
        assert bad.status_code == 401 and "not known" in bad.text
        assert "Where is my new card" not in bad.text


def test_reviewer_outside_the_policy_sees_nothing_of_the_dataset(tmp_path: Path) -> None:
    with live_site(tmp_path) as live, live.client() as client:
        token = csrf_of(client.get("/login").text)
        reply = client.post("/login", data={"csrf": token, "api_key": live.keys["mallory"]})
        assert reply.status_code == 403
        assert "REVIEWER_NOT_ALLOWED" not in reply.text  # the message says why, in words
        assert "is not a reviewer of project 'bank'" in html.unescape(reply.text)
        for path in ("/", "/rows/ds-traffic-0%3A0"):
            page = client.get(path)
            assert page.status_code == 303  # never signed in
        denied = live.events("review_access")
        assert denied[-1]["user"] == "mallory" and "REVIEWER_NOT_ALLOWED" in denied[-1]["reasons"]


def test_policy_change_is_judged_on_every_page(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        client = live.sign_in("bob")
        assert client.get("/").status_code == 200
        # the same site, but the policy now lists only alice for the project
        narrowed = {**POLICY, "review": {"reviewers": {"bank": ["alice"]}}}
        object.__setattr__(live.site, "policies", PolicySet([policy_from_data(narrowed)]))
        page = client.get("/rows/ds-traffic-1%3A0")
        assert page.status_code == 403 and "My top up did not go through" not in page.text
        assert client.get("/").status_code == 403


def test_every_form_needs_the_csrf_token(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        client = live.sign_in("alice")
        page = client.get("/rows/ds-traffic-1%3A0")
        version = version_of(page.text)
        for data in ({"row_version": str(version)}, {"row_version": str(version), "csrf": "forged"}):
            reply = client.post("/rows/ds-traffic-1%3A0/accept", data=data)
            assert reply.status_code == 403 and "did not come from this site" in reply.text
        assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
        wc = live.dataset()
        try:
            assert wc.get("ds-traffic-1:0").review_state == "unreviewed"
        finally:
            wc.close()
        assert live.events() == []


def test_hostile_teacher_output_is_escaped_and_scripts_are_locked_down(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        client = live.sign_in("alice")
        page = client.get("/rows/ds-traffic-0%3A0")
        assert page.status_code == 200
        text = page.text
        assert "<script>window" not in text and "<img src=x" not in text and 'href=\\"javascript:' not in text
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text
        assert "&lt;b&gt;bold&lt;/b&gt;" in text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY"
        cookie = page.request.headers.get("cookie", "")
        assert "distillgate_review=" in cookie
        login = live.client().get("/login")
        set_cookie = login.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        # the JSON editor of a structured row: the answer (and a reviewer's rejected draft) stay inside the textarea
        page = client.get("/rows/ds-traffic-7%3A0")
        editor = page.text.split('<textarea id="answer-json"', 1)[1].split("</textarea>", 1)[0]
        assert "&lt;/textarea&gt;&lt;script&gt;window.__pwned = 4&lt;/script&gt;" in editor
        assert "</textarea><script>" not in page.text and "<script>window" not in page.text
        draft = '{"category": "</textarea><img src=x onerror=alert(1)>", "amount": 1, "currency": "EUR"}'
        refused = client.post("/rows/ds-traffic-7%3A0/correct", data={
            "csrf": csrf_of(page.text), "row_version": str(version_of(page.text)), "answer_json": draft,
            "reason": "<b>why</b>"})
        assert refused.status_code == 400
        assert "<img src=x" not in refused.text and "</textarea><img" not in refused.text
        assert "&lt;/textarea&gt;&lt;img src=x onerror=alert(1)&gt;" in refused.text
        assert 'value="&lt;b&gt;why&lt;/b&gt;"' in refused.text


def test_sessions_expire(tmp_path: Path, clock: FakeClock) -> None:
    with live_site(tmp_path, clock=clock, session_ttl_s=600) as live:
        client = live.sign_in("alice")
        assert client.get("/").status_code == 200
        clock.advance(601)
        reply = client.get("/")
        assert reply.status_code == 303 and reply.headers["location"] == "/login"
        assert "session expired" in client.get("/login").text


def test_a_revoked_key_ends_its_sessions(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        client = live.sign_in("alice")
        keys = KeyStore(live.site.db)
        try:
            (key,) = keys.list(user="alice")
            keys.revoke(key.key_id)
        finally:
            keys.close()
        assert client.get("/").status_code == 303


def test_two_reviewers_never_work_the_same_row(tmp_path: Path, clock: FakeClock) -> None:
    with live_site(tmp_path, clock=clock, lease_ttl_s=120) as live:
        alice, bob = live.sign_in("alice"), live.sign_in("bob")
        first = alice.get("/queues/disagreement/next")
        assert first.headers["location"] == "/rows/ds-traffic-0%3A0?queue=disagreement"
        again = alice.get("/queues/disagreement/next")  # a reload keeps alice on her row
        assert again.headers["location"] == first.headers["location"]
        other = bob.get("/queues/disagreement/next")
        assert other.headers["location"] == "/rows/ds-traffic-2%3A0?queue=disagreement"
        # bob opens alice's row directly: read-only, and a forged write is refused
        page = bob.get("/rows/ds-traffic-0%3A0")
        assert page.status_code == 200 and "being reviewed by alice" in page.text
        assert 'id="accept-form"' not in page.text
        token = csrf_of(page.text)
        refused = bob.post("/rows/ds-traffic-0%3A0/accept", data={"csrf": token, "row_version": "2"})
        assert refused.status_code == 409 and "being reviewed by alice" in refused.text
        # the lease runs out: bob may take the row
        clock.advance(121)
        page = bob.get("/rows/ds-traffic-0%3A0")
        assert 'id="accept-form"' in page.text
        taken = bob.post("/rows/ds-traffic-0%3A0/accept",
                         data={"csrf": csrf_of(page.text), "row_version": str(version_of(page.text))})
        assert taken.status_code == 303
        assert [e["reviewer"] for e in live.events()] == ["bob"]


def test_a_stale_form_cannot_overwrite_a_newer_edit(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        alice = live.sign_in("alice")
        page = alice.get("/rows/ds-traffic-1%3A0")
        token, version = csrf_of(page.text), version_of(page.text)
        # meanwhile the row changes (an engineer on the CLI, or a rebuild)
        wc = live.dataset()
        try:
            review.release(wc, "ds-traffic-1:0", "alice")
            review.correct(wc, "ds-traffic-1:0", "carol", version, "card_arrival", "from the CLI")
        finally:
            wc.close()
        stale = alice.post("/rows/ds-traffic-1%3A0/correct",
                           data={"csrf": token, "row_version": str(version), "label": "exchange_rate",
                                 "reason": "my stale view"})
        assert stale.status_code == 409
        assert f"you had version {version}, it is now version {version + 1}" in stale.text
        assert "The row below is the current version" in stale.text and "from the CLI" in stale.text
        wc = live.dataset()
        try:
            row = wc.get("ds-traffic-1:0")
        finally:
            wc.close()
        assert (row.label, row.reviewer) == ("card_arrival", "carol")
        assert live.events() == []  # nothing was saved, nothing logged


def test_corrections_must_use_an_allowed_label_and_a_reason(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        alice = live.sign_in("alice")
        page = alice.get("/rows/ds-traffic-4%3A0")
        assert '<option value="request_refund">' in page.text  # the picker offers the allowed labels
        data = {"csrf": csrf_of(page.text), "row_version": str(version_of(page.text))}
        bad = alice.post("/rows/ds-traffic-4%3A0/correct", data={**data, "label": "pizza", "reason": "x"})
        assert bad.status_code == 400 and "not an allowed label" in bad.text
        no_reason = alice.post("/rows/ds-traffic-4%3A0/reject", data=data)
        assert no_reason.status_code == 400 and "needs a reason" in no_reason.text
        ok = alice.post("/rows/ds-traffic-4%3A0/correct", data={**data, "label": "refusal", "reason": "abusive"})
        assert ok.status_code == 303
        (event,) = live.events()
        assert (event["action"], event["after"]["label"], event["reviewer"]) == ("correct", "refusal", "alice")
        assert event["before"]["label"] == "request_refund" and event["reason"] == "abusive"
        assert event["dataset"] == "bank-intents" and event["run"] == "run-7" and event["edited"] is True


def test_overview_shows_queues_labels_reasons_edits_and_the_version_diff(tmp_path: Path) -> None:
    from distillgate.data.versions import freeze

    with live_site(tmp_path) as live:
        wc = live.dataset()
        try:
            freeze(wc, notes="first")
            row = wc.get("ds-traffic-5:0")
            review.reject(wc, row.row_id, "bob", row.version, "not a banking question")
        finally:
            wc.close()
        page = live.sign_in("alice").get("/")
        text = page.text
        assert page.status_code == 200
        assert 'href="/queues/disagreement/next"' in text and "SAMPLE_DISAGREEMENT" in text
        assert "card_arrival" in text and "Edits by reviewer" in text and "<td>bob</td>" in text
        assert "human edit: <strong>1</strong>" in text
        assert "ds-traffic-5:0" in text


def test_row_view_shows_samples_probabilities_source_and_near_duplicates(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        client = live.sign_in("alice")
        text = html.unescape(client.get("/rows/ds-traffic-0%3A1").text)
        assert "confidence <strong>45%</strong>" in text and "samples agree 50%" in text
        assert '<meter min="0" max="1" value="0.45" aria-label="top_up_failed probability">' in text
        page = client.get("/rows/ds-traffic-3%3A1")
        text = html.unescape(page.text)
        assert page.status_code == 200
        assert text.count('<article class="sample') == 2 and "lost_or_stolen_card" in text
        assert "SAMPLE_DISAGREEMENT" in text and "ds-traffic.jsonl · record 3" in text
        assert 'href="/rows/ds-traffic-6%3A0"' in page.text and "I think someone stole my card yesterday" in text


def test_signing_out_frees_the_reviewers_rows(tmp_path: Path) -> None:
    with live_site(tmp_path) as live:
        alice, bob = live.sign_in("alice"), live.sign_in("bob")
        page = alice.get("/rows/ds-traffic-1%3A0")
        assert 'being reviewed by alice' in bob.get("/rows/ds-traffic-1%3A0").text
        out = alice.post("/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303 and alice.get("/").status_code == 303
        assert 'id="accept-form"' in bob.get("/rows/ds-traffic-1%3A0").text


def test_the_row_page_shows_the_rubric_grade_and_the_trace_escaped(tmp_path: Path) -> None:
    from distillgate.data.store import WorkingCopy

    with live_site(tmp_path) as live:
        with WorkingCopy.open(live.site.dataset) as wc:
            row = wc.get("ds-traffic-0:0")
            row.grade, row.trace = 2.0, "It is <script>window.__pwned = 9</script> lost."
            row.grading = {"rubric_id": "helpful-v1", "model": "fake-teacher", "scale": [1, 5],
                           "scores": {"correct": 1, "clear": 3}, "error": None}
            wc.update_row(row, row.version)
        client = live.sign_in("alice")
        text = client.get("/rows/ds-traffic-0%3A0").text
        assert "Rubric grade <strong>2</strong>" in text and "correct 1, clear 3" in text and "helpful-v1" in text
        assert "&lt;script&gt;window.__pwned = 9&lt;/script&gt;" in text and "<script>window" not in text
        assert "low_grade" in client.get("/").text  # the queue is offered on the overview
