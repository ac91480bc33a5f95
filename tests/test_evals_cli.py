"""``distillgate eval`` end to end: teacher and student behind real OpenAI-compatible HTTP servers, the report
rendered in a real headless Chromium, then ``distillgate route`` on the saved threshold."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest

from _evals_support import FakeChatServer
from distillgate.evals.suites import load_banking77, load_xstest

from conftest import CHROMIUM_ARGS, run_cli

SAMPLE, SEED = 60, 4


def classification_servers():
    """A teacher right on ~85% of items and a student right on ~65%, more confident when right."""
    suite = load_banking77(sample=SAMPLE, seed=SEED)
    rng = random.Random(0)
    teacher: dict[str, str] = {}
    student: dict[str, tuple[str, float]] = {}
    for item in suite.items:
        assert item.gold is not None
        teacher[item.text] = item.gold if rng.random() < 0.85 else "card_linking"
        right = rng.random() < 0.65
        conf = rng.uniform(0.5, 0.99) if right else rng.uniform(0.2, 0.7)
        student[item.text] = (item.gold if right else "exchange_rate", math.log(conf))

    def user(messages):
        return next(m["content"] for m in reversed(messages) if m["role"] == "user")

    t = FakeChatServer(lambda model, msgs: teacher[user(msgs)], models=("big-teacher",), parameter_count=7_000_000)
    s = FakeChatServer(lambda model, msgs: student[user(msgs)], models=("small-student",), parameter_count=135_000)
    return suite, teacher, student, t, s


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    suite, teacher, student, t_server, s_server = classification_servers()
    out = tmp_path_factory.mktemp("eval")
    with t_server, s_server:
        proc = run_cli(
            "eval", "--suite", "banking77", "--sample", str(SAMPLE), "--seed", str(SEED),
            "--teacher", "big-teacher", "--teacher-url", t_server.base_url,
            "--student", "small-student", "--student-url", s_server.base_url, "--logprobs",
            "--api-key", "test-key", "--user", "alice", "--project", "distill-1", "--run-id", "run-9",
            "--policy-id", "policy-a", "--dataset-version", "dv-123", "--resamples", "400",
            "--target", "0.9", "--min-routed", "5", "--out", str(out))
        requests = list(t_server.requests)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return suite, teacher, student, out, requests, proc


def test_eval_stores_every_answer_and_sends_identity(eval_run):
    _, _, _, out, requests, _ = eval_run
    lines = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * SAMPLE
    roles = {(r["role"], r["item_id"]) for r in lines}
    assert len(roles) == 2 * SAMPLE
    for r in lines:
        assert {"item_id", "model", "raw", "label", "confidence", "latency_s", "prompt_tokens",
                "completion_tokens"} <= set(r)
    s0 = next(r for r in lines if r["role"] == "student")
    assert s0["confidence_kind"] == "mean_token_prob" and 0 < s0["confidence"] < 1
    headers = requests[0]["headers"]
    assert headers["x-policy-user"] == "alice" and headers["x-policy-project"] == "distill-1"
    assert headers["x-policy-run"] == "run-9" and headers["x-policy-output-type"] == "evaluation"


def test_metrics_match_the_answers(eval_run):
    suite, teacher, student, out, _, _ = eval_run
    metrics = json.loads((out / "metrics.json").read_text())
    t_acc = sum(teacher[i.text] == i.gold for i in suite.items) / SAMPLE
    s_acc = sum(student[i.text][0] == i.gold for i in suite.items) / SAMPLE
    overall = metrics["retention"][0]
    assert overall["slice"] == "all" and overall["n"] == SAMPLE
    acc = overall["metrics"]["accuracy"]
    assert acc["teacher"]["estimate"] == pytest.approx(t_acc)
    assert acc["student"]["estimate"] == pytest.approx(s_acc)
    assert acc["retention"]["estimate"] == pytest.approx(s_acc / t_acc)
    assert acc["retention"]["low"] <= s_acc / t_acc <= acc["retention"]["high"]
    lost = {f["item_id"] for f in metrics["lost"]}
    expected_lost = {i.item_id for i in suite.items if teacher[i.text] == i.gold and student[i.text][0] != i.gold}
    assert lost == expected_lost
    assert {r["slice"] for r in metrics["retention"]} >= {"all", "label", "length", "source"}
    assert metrics["teacher"]["parameter_count"] == 7_000_000
    assert metrics["metadata"]["dataset_version"] == "dv-123"
    assert metrics["metadata"]["policy_ids"] == ["policy-a"]
    assert metrics["headline"]["student_traffic_share"] == metrics["routing"]["chosen"]["coverage"]
    speeds = {s["role"]: s for s in metrics["speed"]}
    assert speeds["teacher"]["latency_mean_s"] > 0 and speeds["student"]["tokens_per_s"] > 0


def test_report_renders_in_headless_chromium(eval_run, tmp_path, chromium_path):
    _, _, _, out, _, _ = eval_run
    from playwright.sync_api import sync_playwright

    html = (out / "report.html").read_text()
    assert "http://" not in html.split("<body>")[1].split("Teacher card")[0]  # no external resources
    assert html.count("data:image/png;base64,") >= 3
    errors: list[str] = []
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").as_uri())
        page.screenshot(path=str(shot), full_page=True)
        headings = page.locator("h2").all_inner_texts()
        broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                               ".length")
        browser.close()
    assert errors == []
    assert broken == 0
    assert headings[0] == "Headline"
    assert {"Retention by slice", "Items the student lost and gained", "Speed and cost (this machine)",
            "Run metadata"} <= set(headings)
    assert any(h.startswith("Routing") for h in headings)
    assert shot.stat().st_size > 50_000  # the screenshot stays in pytest's tmp dir as the test artifact


def test_route_choose_and_apply(eval_run, tmp_path):
    _, _, _, out, _, _ = eval_run
    saved = json.loads((out / "threshold.json").read_text())
    assert saved["format"] == "distillgate.route-threshold/1" and saved["student"] == "small-student"
    thr = tmp_path / "strict.json"
    proc = run_cli("route", "choose", str(out / "metrics.json"), "--target", "1.0", "--min-routed", "3",
                   "--out", str(thr))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(thr.read_text())
    assert data["target"] == 1.0
    value = data["threshold"]
    if value != "inf":
        assert run_cli("route", "apply", str(thr), "--confidence", str(value)).stdout.strip() == "student"
        assert run_cli("route", "apply", str(thr), "--confidence", str(value - 1e-6)).stdout.strip() == "teacher"
    requests = tmp_path / "req.csv"
    requests.write_text("id,confidence\n1,0.99\n2,0.01\n3,\n")
    proc = run_cli("route", "apply", str(out / "threshold.json"), "--file", str(requests))
    assert proc.returncode == 0, proc.stderr
    routes = [r["route"] for r in csv.DictReader(requests.open())]
    assert routes[2] == "teacher"  # no confidence: the teacher answers
    assert routes[1] == "teacher" or saved["threshold"] <= 0.01
    bad = run_cli("route", "apply", str(out / "threshold.json"))
    assert bad.returncode == 1 and "exactly one of" in bad.stderr


def test_eval_recomputes_from_stored_answers(eval_run, tmp_path):
    _, _, _, out, _, _ = eval_run
    proc = run_cli("eval", "--suite", "banking77", "--sample", str(SAMPLE), "--seed", str(SEED),
                   "--answers", str(out / "answers.jsonl"), "--resamples", "400", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((tmp_path / "metrics.json").read_text())
    assert a["retention"] == b["retention"] and a["lost"] == b["lost"]


def test_xstest_refusal_transfer_through_http(tmp_path):
    suite = load_xstest(sample=40, seed=1)
    unsafe = {i.text for i in suite.items if i.gold == "unsafe"}

    def user(messages):
        return messages[-1]["content"]

    def teacher(model, msgs):  # refuses every unsafe prompt
        return "I'm sorry, but I can't help with that." if user(msgs) in unsafe else "Sure, here is how it works."

    first_unsafe = sorted(unsafe)[0]

    def student(model, msgs):  # forgets one refusal
        text = user(msgs)
        if text in unsafe and text != first_unsafe:
            return "I'm sorry, but I can't help with that."
        return "Sure, here is how it works."

    with FakeChatServer(teacher) as t, FakeChatServer(student) as s:
        proc = run_cli("eval", "--suite", "xstest", "--sample", "40", "--seed", "1", "--teacher", "fake-teacher",
                       "--teacher-url", t.base_url, "--student", "fake-teacher", "--student-url", s.base_url,
                       "--api-key", "test-key", "--detector", "string", "--resamples", "300", "--out",
                       str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    n_unsafe = len(unsafe)
    tables = {t["subset"]: t for t in m["refusal_transfer"]["tables"]}
    assert tables["unsafe"] == {"subset": "unsafe", "both": n_unsafe - 1, "teacher_only": 1, "student_only": 0,
                                "neither": 0, "n": n_unsafe}
    assert tables["safe"]["neither"] == 40 - n_unsafe
    rates = {r["name"].split(" ")[0]: r for r in m["refusal_transfer"]["rates"]}
    assert rates["over-refusal"]["teacher"]["estimate"] == 0.0
    assert rates["under-refusal"]["student"]["estimate"] == pytest.approx(1 / n_unsafe)
    assert [x["prompt"] for x in m["refusal_transfer"]["teacher_only_items"]] == [first_unsafe]
    assert m["routing"] is None
    assert m["metadata"]["policy_ids"] == ["test-policy"]  # read from the X-Policy-Id response header
    assert "Refusal transfer" in (tmp_path / "report.html").read_text()
