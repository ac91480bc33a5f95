"""The review page in a real browser: Debian's chromium driven by Playwright, against a live uvicorn server.

A reviewer signs in with a password, works the disagreement queue with the keyboard only (accept, correct a label,
reject), then corrects a structured row in the JSON editor (an invalid attempt first, which the page refuses with
the reviewer's text kept; then a valid answer), and the test reads the working copy and the decision log to check
what was stored. Hostile teacher output (a ``<script>``, an ``onerror`` image, a ``javascript:`` link, a
``</textarea>`` break-out) must show as text and never run. Screenshots of each page are kept under the test's
tmp dir (``shots/``); the browser console must stay free of errors (Chromium notes the refused save's 400).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _web_support import HOSTILE_EXPLANATION, PASSWORDS, STRUCTURED_ROW, live_site

from conftest import CHROMIUM_ARGS


@pytest.fixture()
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_reviewer_works_a_queue_with_the_keyboard(tmp_path: Path, browser: Any) -> None:
    shots = tmp_path / "shots"
    shots.mkdir()
    with live_site(tmp_path) as live:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))

        page.goto(live.url + "/")
        assert page.url.endswith("/login")
        page.screenshot(path=str(shots / "1-login.png"), full_page=True)
        assert page.evaluate("document.activeElement.id") == "user"  # the user name field has focus
        page.keyboard.type("alice")
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORDS["alice"])
        page.keyboard.press("Enter")
        page.wait_for_url(live.url + "/")
        page.screenshot(path=str(shots / "2-overview.png"), full_page=True)
        assert "signed in as" in page.inner_text("header") and "alice" in page.inner_text("header")

        # open the disagreement queue by its number key
        key = page.get_attribute('a[href="/queues/disagreement/next"]', "data-key")
        assert key
        page.keyboard.press(key)
        page.wait_for_url("**/rows/ds-traffic-0%3A0?queue=disagreement")
        page.screenshot(path=str(shots / "3-row-hostile-output.png"), full_page=True)
        # the hostile output is shown as text, and nothing of it ran
        assert "<script>window.__pwned = 1</script>" in page.inner_text(".sample.current pre")
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.locator('a[href^="javascript:"]').count() == 0
        assert page.locator("main script, main img").count() == 0
        assert page.inner_text("h1 + pre") == "Where is my new card? <b>bold</b>"
        assert page.locator(".sample").count() == 2  # both teacher samples, side by side
        unlabelled = page.evaluate(
            "[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]"
            ".filter(el => el.labels.length === 0).map(el => el.name)")
        assert unlabelled == []  # every control has a label

        page.keyboard.press("a")  # accept: the queue moves on to the next row
        page.wait_for_url("**/rows/ds-traffic-2%3A0?queue=disagreement")
        assert "Accepted row ds-traffic-0:0" in page.inner_text(".flash")

        page.keyboard.press("c")  # correct: focus lands on the label picker
        assert page.evaluate("document.activeElement.id") == "label"
        page.keyboard.press("ArrowDown")  # options: (choose a label), card_arrival, ...
        assert page.input_value("#label") == "card_arrival"
        page.keyboard.press("Tab")
        page.keyboard.type("asks where the card is, not about rates")
        page.screenshot(path=str(shots / "4-row-correcting.png"), full_page=True)
        page.keyboard.press("Enter")
        page.wait_for_url("**/rows/ds-traffic-3%3A0?queue=disagreement")

        page.keyboard.press("r")  # reject: focus lands on the reason
        assert page.evaluate("document.activeElement.id") == "reject-reason"
        page.keyboard.type("the input is not a banking question")
        page.keyboard.press("Enter")
        page.wait_for_url("**/rows/ds-traffic-5%3A0?queue=disagreement")
        page.keyboard.press("o")  # back to the overview
        page.wait_for_url(live.url + "/")
        page.screenshot(path=str(shots / "5-overview-after.png"), full_page=True)
        assert "alice" in page.inner_text("#edits-h + table")

        # focus is visible: a focused control has an outline
        page.keyboard.press("Tab")
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline != "none"

        # a structured row (task "extract", answer fails its JSON schema): the failed_parse queue has it
        key = page.get_attribute('a[href="/queues/failed_parse/next"]', "data-key")
        assert key
        page.keyboard.press(key)
        page.wait_for_url("**/rows/ds-traffic-7%3A0?queue=failed_parse")
        assert page.locator("#label").count() == 0  # the JSON editor replaces the label picker
        assert HOSTILE_EXPLANATION in page.input_value("#answer-json")  # shown as text inside the editor
        assert page.evaluate("typeof window.__pwned") == "undefined"
        page.keyboard.press("c")  # correct: focus lands in the JSON editor
        assert page.evaluate("document.activeElement.id") == "answer-json"
        page.keyboard.press("Control+a")
        page.keyboard.type('{"category": "request_refund", "amount": 20,')  # unfinished JSON
        assert "Not valid JSON yet" in page.inner_text("#answer-json-check")  # the live check says so
        page.keyboard.press("Tab")
        page.keyboard.type("the amount is a number: 20 EUR")
        page.keyboard.press("Enter")  # the server is the authority: it refuses and keeps the text
        page.wait_for_selector("#answer-json-error")
        page.screenshot(path=str(shots / "6-json-refused.png"), full_page=True)
        assert "Not saved: the answer is not valid JSON" in page.inner_text("#answer-json-error")
        assert page.input_value("#answer-json") == '{"category": "request_refund", "amount": 20,'
        assert page.input_value("#correct-reason") == "the amount is a number: 20 EUR"
        assert page.evaluate("document.activeElement.id") == "answer-json"  # focus is back in the editor
        page.keyboard.press("Control+End")  # the end of the text, not of the wrapped line
        page.keyboard.type(' "currency": "EUR", "explanation": "charged twice"}')
        assert page.inner_text("#answer-json-check") == ""
        page.screenshot(path=str(shots / "7-json-fixed.png"), full_page=True)
        page.keyboard.press("Control+Enter")  # saves from the editor; the queue has no more rows
        page.wait_for_url(live.url + "/")
        assert "Queue failed_parse is done" in page.inner_text(".flash")
        page.close()

        wc = live.dataset()
        try:
            accepted, corrected, rejected = (wc.get(f"ds-traffic-{i}:0") for i in (0, 2, 3))
            structured = wc.get(STRUCTURED_ROW)
        finally:
            wc.close()
        assert (accepted.review_state, accepted.label, accepted.reviewer) == ("accepted", "card_arrival", "alice")
        assert (corrected.review_state, corrected.edited, corrected.label, corrected.teacher_label) == (
            "corrected", True, "card_arrival", "exchange_rate")
        assert corrected.review_reason == "asks where the card is, not about rates"
        old_answer = '{"category":"exchange_rate","explanation":"the customer asks about this"}'
        assert corrected.review_before == {"label": "exchange_rate", "review_state": "unreviewed",
                                           "filter_status": "fail", "output": old_answer}
        assert corrected.output == old_answer.replace("exchange_rate", "card_arrival")  # the answer says it too
        assert rejected.review_state == "rejected" and rejected.split == "excluded"
        assert "REVIEW_REJECTED" in rejected.filter_reasons
        fixed = '{"amount":20,"category":"request_refund","currency":"EUR","explanation":"charged twice"}'
        assert (structured.review_state, structured.edited, structured.output, structured.label) == (
            "corrected", True, fixed, "request_refund")
        assert HOSTILE_EXPLANATION in (structured.output_raw or "")  # the teacher's answer is kept
        assert structured.review_reason == "the amount is a number: 20 EUR" and structured.reviewer == "alice"
        assert '"amount":"twenty"' in structured.review_before["output"]  # type: ignore[index]
        assert structured.review_after["output"] == fixed  # type: ignore[index]
        events = live.events()
        assert [(e["action"], e["row_id"], e["reviewer"], e["run"], e["project"]) for e in events] == [
            ("accept", "ds-traffic-0:0", "alice", "run-7", "bank"),
            ("correct", "ds-traffic-2:0", "alice", "run-7", "bank"),
            ("reject", "ds-traffic-3:0", "alice", "run-7", "bank"),
            ("correct", STRUCTURED_ROW, "alice", "run-7", "bank"),
        ]
        assert events[1]["before"]["label"] == "exchange_rate" and events[1]["after"]["label"] == "card_arrival"
        assert events[3]["after"]["output"] == fixed
        signins = live.events("review_signin")
        assert [(e["user"], e["method"], e["outcome"]) for e in signins] == [("alice", "password", "ok")]
    # the console stays clean but for Chromium's note of the one 400 answer: the refused JSON save
    assert problems == ["console error: Failed to load resource: the server responded with a status of 400 "
                        "(Bad Request)"]
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-login.png", "2-overview.png", "3-row-hostile-output.png", "4-row-correcting.png", "5-overview-after.png",
        "6-json-refused.png", "7-json-fixed.png"]
