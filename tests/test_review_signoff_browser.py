"""Who reviewed the run, in a real browser (Debian's chromium driven by Playwright, a live uvicorn server).

1. The page refuses a non-reviewer, the run's requester, a disabled account and a revoked key, each logged as a
   ``review_access`` denial with its reason code (the same code path the review CLI uses).
2. A whole study (``distillgate run`` with the fake teacher over HTTP and a tiny real student; slow): training and a
   dataset export are refused with REVIEWER_REQUIRED; two reviewers sign off on the page; the run then trains,
   evaluates and exports, the bundle and the report name both reviewers, and ``audit verify`` passes on the log.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from _web_support import serve_site
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy.model import load_policies
from distillgate.web import ReviewSite
from test_review_signoff import PASSWORD, study  # noqa: F401  (the fixture)

from conftest import run_cli

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")


@pytest.fixture()
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        try:
            yield b
        finally:
            b.close()


def sign_in_with_key(browser: Any, url: str, key: str) -> Any:
    page = browser.new_context().new_page()
    page.goto(url + "/login")
    page.fill("#api_key", key)
    page.click("#key-form button")
    return page


def sign_in_with_password(browser: Any, url: str, user: str, password: str) -> Any:
    page = browser.new_context().new_page()
    page.goto(url + "/login")
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#password-form button")
    return page


@pytest.mark.slow
def test_page_refuses_non_reviewer_requester_disabled_account_and_revoked_key(
        study: dict[str, Any], browser: Any) -> None:  # noqa: F811
    site = ReviewSite(dataset=study["ds"], db=study["db"], policies=load_policies(study["policy"]), project="bank",
                      run="r1")
    keys = study["keys"]
    with serve_site(site, keys) as live:
        refusals = [
            (sign_in_with_key(browser, live.url, keys["mallory"]), "'mallory' is not a reviewer of project 'bank'"),
            (sign_in_with_key(browser, live.url, keys["alice"]), "'alice' cannot review their own run"),
            (sign_in_with_password(browser, live.url, "erin", PASSWORD), "the reviewer account 'erin' is disabled"),
            (sign_in_with_key(browser, live.url, keys["revoked"]), "this API key was revoked"),
        ]
        for page, words in refusals:
            assert words in html.unescape(page.content()), words
            page.goto(live.url + "/")  # and no page of the dataset opens
            assert page.url.endswith("/login") and page.locator("#sign-off").count() == 0
        denied = live.events("review_access")
        assert [(e["user"], e["reasons"]) for e in denied] == [
            ("mallory", ["REVIEWER_NOT_ALLOWED"]), ("alice", ["REVIEWER_NOT_ALLOWED"]),
            ("erin", ["ACCOUNT_DISABLED"]), ("dave", ["KEY_REVOKED"])]
        assert live.events("signoff") == []


def _project(tmp: Path, upstream: str) -> Path:
    from test_run_pipeline import write_project

    root = Path(__file__).resolve().parent.parent
    path = write_project(tmp, upstream, eval={"suites": [{"name": "banking77", "sample": 6, "path": str(
        root / "data" / "banking77" / "test.csv")}], "resamples": 200, "min_routed": 2})
    policy = json.loads((tmp / "policy.json").read_text())
    policy["review"] = {"required": True, "reviewers": {"internal-compression": ["carol", "dave"]},
                        "min_reviewers": 2}
    (tmp / "policy.json").write_text(json.dumps(policy))
    return path


@pytest.mark.slow
def test_a_study_is_refused_until_two_reviewers_sign_off_on_the_page(tmp_path: Path, browser: Any) -> None:
    from test_run_pipeline import tiny_student

    from fakes.fake_upstream import fake_upstream

    tiny_student(tmp_path / "tiny")
    work, db = tmp_path / "work", tmp_path / "work" / "distillgate.db"
    with fake_upstream(reply="card_arrival") as fake:
        project = _project(tmp_path, fake.base_url)
        first = run_cli("run", str(project), timeout=900)
        assert first.returncode == 2, first.stderr[-3000:]
        assert "REVIEWER_REQUIRED" in first.stderr and "signed off by nobody" in first.stderr
        assert not (work / "stages" / "train.json").exists()
        bundles = (tmp_path / "bundles").as_uri() + "/"
        gov = ["--db", str(db), "--policy", str(tmp_path / "policy.json"), "--project", "internal-compression",
               "--run", "tiny-run-1", "--user", "alice"]
        export = run_cli("dataset", "export", str(work / "dataset"), bundles + "dataset/", *gov)
        assert export.returncode == 2 and "REVIEWER_REQUIRED" in export.stderr

        keys = KeyStore(db)
        secrets = {user: keys.create(user)[1] for user in ("carol", "dave")}
        keys.close()
        site = ReviewSite(dataset=work / "dataset", db=db, policies=load_policies(tmp_path / "policy.json"),
                          project="internal-compression", run="tiny-run-1")
        with serve_site(site, secrets) as live:
            for user in ("carol", "dave"):
                page = sign_in_with_key(browser, live.url, secrets[user])
                assert page.url == live.url + "/"
                page.click("#sign-off")
                page.wait_for_url(live.url + "/")
                assert "Signed off version" in page.inner_text(".flash")
                assert user in page.inner_text("table.signoffs")
        signed = live.events("signoff")
        assert [s["reviewer"] for s in signed] == ["carol", "dave"] and len({s["version_id"] for s in signed}) == 1

        second = run_cli("run", str(project), timeout=900)
        assert second.returncode == 0, second.stderr[-3000:]
        exported = run_cli("dataset", "export", str(work / "dataset"), bundles + "dataset/", *gov)
        assert exported.returncode == 0, exported.stderr

    bundle = json.loads((tmp_path / "bundles" / "tiny-run-1" / "bundle.json").read_text())
    assert [s["reviewer"] for s in bundle["signoffs"]] == ["carol", "dave"]
    assert bundle["dataset_version"] == signed[0]["version_id"]
    report = (work / "report.html").read_text()
    assert "signed off by" in report and "carol at" in report and "dave at" in report
    record = json.loads((work / "train" / "run.json").read_text())
    card = record["provenance"]
    assert card["dataset_version"] == signed[0]["version_id"] and [s["reviewer"] for s in card["signoffs"]] == [
        "carol", "dave"]
    assert card["checkpoint"]["signature"]
    doc = yaml.safe_load(project.read_text())
    with Store.open(db) as store:
        kinds = [(e.body.get("request_kind"), e.body.get("decision")) for e in store.entries(kind="decision")
                 if e.body.get("request_kind") in ("train", "promote", "export")]
    assert kinds[0] == ("train", "deny") and ("train", "allow") in kinds and ("promote", "allow") in kinds
    assert doc["run"] == "tiny-run-1"
    verify = run_cli("audit", "verify", "--db", str(db))
    assert verify.returncode == 0, verify.stderr
    trace = run_cli("audit", "trace", str(work / "train"), "--db", str(db))
    assert trace.returncode == 0, trace.stderr + trace.stdout
    assert "carol" in trace.stdout and "dave" in trace.stdout and "rows without a signed decision: 0" in trace.stdout
