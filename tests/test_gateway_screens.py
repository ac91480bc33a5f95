"""Prompt screens: precision/recall on the labelled set in tests/data, false positives on real benign prompts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillgate.errors import ConfigError
from distillgate.gateway.screens import (
    CREDENTIAL_CLASS,
    EXTRACTION_CLASS,
    CredentialScreen,
    ExtractionScreen,
    ScreenHit,
    _entropy,
    load_screens,
    run_screens,
)

ROOT = Path(__file__).resolve().parent.parent
LABELLED = ROOT / "tests" / "data" / "gateway_screens.jsonl"


def precision_recall(rows: list[dict], cls: str) -> tuple[float, float, int]:
    screens = load_screens()
    tp = fp = fn = 0
    for row in rows:
        predicted = cls in {h.output_class for h in run_screens(screens, row["text"])}
        actual = cls in row["labels"]
        tp += predicted and actual
        fp += predicted and not actual
        fn += actual and not predicted
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return precision, recall, tp + fn


@pytest.mark.parametrize("cls", [CREDENTIAL_CLASS, EXTRACTION_CLASS])
def test_labelled_set_precision_recall(cls: str) -> None:
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    precision, recall, positives = precision_recall(rows, cls)
    print(f"{cls}: precision {precision:.3f} recall {recall:.3f} on {positives} positives / {len(rows)} rows")
    assert positives >= 20
    assert precision >= 0.95 and recall >= 0.9


def test_real_benign_prompts_rarely_fire() -> None:
    """XSTest (safe and unsafe prompts, none with credentials or extraction) and banking77 customer messages."""
    screens = load_screens()
    xstest = [r["prompt"] for r in csv.DictReader((ROOT / "data/xstest/xstest_prompts.csv").open())]
    banking = [r["text"] for r in csv.DictReader((ROOT / "data/banking77/test.csv").open())]
    for texts in (xstest, banking):
        hits = sum(1 for t in texts if run_screens(screens, t))
        assert hits / len(texts) <= 0.01, hits


class Shouting:
    name = "shouting"
    output_class = "shouting"

    def scan(self, text: str) -> ScreenHit | None:
        return ScreenHit(self.name, self.output_class, "caps") if text.isupper() else None


SHOUTING = Shouting()


def test_screens_are_pluggable() -> None:
    screens = load_screens(["credentials", "test_gateway_screens:SHOUTING", "test_gateway_screens:Shouting"])
    assert [h.output_class for h in run_screens(screens, "HELLO")] == ["shouting", "shouting"]
    with pytest.raises(ConfigError) as info:
        load_screens(["nonsense", "no.such.module:X", "json:dumps"])
    assert len(info.value.issues) == 3


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_screens_never_crash(text: str) -> None:
    for hit in run_screens(load_screens(), text):
        assert hit.output_class in (CREDENTIAL_CLASS, EXTRACTION_CLASS)


def _without_prefilter(screen: CredentialScreen | ExtractionScreen, text: str) -> bool:
    if any(p.search(text) for _, p in screen.RULES):
        return True
    return isinstance(screen, CredentialScreen) and any(
        _entropy(m.group(1)) >= 3.5 and any(c.isdigit() for c in m.group(1))
        for m in screen.ASSIGNMENT.finditer(text))


fragments = st.sampled_from([
    "AKIA", "ABCDEFGHIJKLMNOP", "sk-", "sk-ant-", "x" * 24, "Q7q9Zk2P", "ghp_", "AIza", "hf_", "Bearer ",
    "api_key=", "password: ", "-----BEGIN PRIVATE KEY-----", "repeat ", "your ", "system prompt", "imitate ",
    "ChatGPT", "Claude", "Gemini", "GPT-4o", "o1", "distill ", "clone ", "the ", " ", ".", "\n", "İ", "ß"])


@settings(max_examples=400, deadline=None)
@given(st.lists(fragments | st.text(max_size=8), max_size=12).map("".join))
def test_prefilter_never_hides_a_rule(text: str) -> None:
    """The cheap substring prefilter is a superset of every rule: same answers as running all rules."""
    for screen in (CredentialScreen(), ExtractionScreen()):
        assert (screen.scan(text) is not None) == _without_prefilter(screen, text)
