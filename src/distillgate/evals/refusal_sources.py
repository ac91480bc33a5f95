"""The labelled answers the fitted refusal detector is built and checked on, read from the files shipped under
``data/refusal/`` (``data/refusal/SOURCE.md`` says where each came from and under which licence).

Every row is a ``SourceRow``: the answer text, its kind, the source it came from, a group (rows of one group are
never split across train and test) and whether its label is three-way or only refused / not refused.

==========================  ======  ====================================================================
source                      labels  what it is
==========================  ======  ====================================================================
``pyrit``                   binary  PyRIT 1.1.0's human-labelled refusal-scorer sets (Microsoft, MIT):
                                    real assistant answers, ``human_score`` 1 = refusal
``uncensorbench``           3-way   UncensorBench 0.3.7 (Wisent AI, MIT): a written refusal and a compliant
                                    answer per harmful prompt, by the authors' designation
``uncensorbench-partial``   3-way   constructed here: an UncensorBench refusal's first sentence, then the
                                    compliant answer (a partial refusal by construction)
``distillgate-train``       3-way   ``data/refusal/train.csv``, written for this project
``distillgate-heldout``     3-way   ``data/refusal/heldout.csv``: real SmolLM2 answers and hand-written ones
``distillgate-chatstyle``   3-way   ``data/refusal/chatstyle_train.csv``: answers written for this project in
                                    the styles of common chat models (``chatstyle_probe.csv``, written the
                                    same way, is held aside and never fitted on)
==========================  ======  ====================================================================

PyRIT labels an answer a refusal when it does not address the *objective*, and its files pair some fluent answers
with other objectives on purpose (an answer about black holes given for "share a fact about anatomy" is scored
1). A detector that reads only the answer cannot see that, and XSTest counts any attempt to answer as
compliance, so ``pyrit_rows`` keeps each distinct answer once: with its on-topic label where the files hold one
(an answer scored 0 for some objective is a non-refusal), and without the answers listed in
``PYRIT_OFF_TOPIC`` (fluent answers to a different, benign question, scored 1 only for being off-topic).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distillgate.errors import UserError
from distillgate.evals.refusal import REFUSAL_DIR, Kind
from distillgate.evals.refusal_agreement import read_labelled_rows
from distillgate.evals.refusal_features import split_head

PUBLIC = REFUSAL_DIR / "public"
PYRIT_DIR = PUBLIC / "pyrit"
PYRIT_FILES = {  # file -> sha256 of the copy shipped from the pyrit==1.1.0 wheel
    "refusal.csv": "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7",
    "refusal_extra.csv": "6ce7f61a8205eb8c29b1a247b52b3730501349f9adf0674a696efb004658a18a",
    "mini_refusal.csv": "6032ce139733e0486f00bd430c069fdde878cd37bfea597671419adf7afbbf37",
}
# Answers scored 1 only because they answer another, benign question (their opening words, as in the files).
PYRIT_OFF_TOPIC = (
    "Certainly! Here are some interesting historical trivia facts:",
    "1. **The Adventures of Luna the Night Owl**",
    "Quantum computing differs from classical computing in several key ways:",
    "Sure, here is a simple workout routine for beginners.",
    "Certainly! The French Revolution, which lasted from 1789 to 1799,",
    "The main stages of cell division are as follows:",
    "Sure! Shakespeare's *Hamlet* is a tragedy about the young Prince of Denmark,",
)
UNCENSORBENCH = PUBLIC / "uncensorbench" / "prompts.json"
UNCENSORBENCH_SHA256 = "27508a2505787bc8111946a7fdeebb227ab3a31b29924a3f7571bfeb3d54413b"
UNCENSORBENCH_TEST_CSV = PUBLIC / "test.csv"
PYRIT_TEST_CSV = PUBLIC / "pyrit_test.csv"
SPLIT_SEED = 20
TEST_TOPICS = 5
PYRIT_TEST_SHARE = 0.5


@dataclass(frozen=True)
class SourceRow:
    source: str
    group: str
    text: str
    kind: Kind
    labels: Literal["3-way", "binary"] = "3-way"
    topic: str = ""
    prompt: str = ""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checked(path: Path, expected: str) -> Path:
    if not path.exists() or sha256(path) != expected:
        raise UserError(f"{path} is missing or not the file this version was built on (sha256 {expected[:12]}…)",
                        hint="restore it from git (data/refusal/SOURCE.md says where it came from)")
    return path


def _pyrit_csv(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(True) if not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("".join(lines))))


def pyrit_rows() -> list[SourceRow]:
    """One row per distinct PyRIT answer: ``safety`` (human_score 1; binary label) or ``comply`` (0)."""
    scores: dict[str, set[str]] = {}
    prompts: dict[str, str] = {}
    for name, digest in PYRIT_FILES.items():
        for row in _pyrit_csv(_checked(PYRIT_DIR / name, digest)):
            text = (row.get("assistant_response") or "").strip()
            if text:
                scores.setdefault(text, set()).add((row.get("human_score") or "").strip())
                prompts.setdefault(text, (row.get("objective") or "").strip())
    out = []
    for text, labels in scores.items():
        if text.startswith(PYRIT_OFF_TOPIC):
            continue
        kind: Kind = "comply" if "0" in labels else "safety"
        group = "pyrit-" + hashlib.sha256(text.encode()).hexdigest()[:10]
        out.append(SourceRow("pyrit", group, text, kind, "binary", prompt=prompts[text]))
    return out


def pyrit_split(rows: list[SourceRow]) -> tuple[list[SourceRow], list[SourceRow]]:
    """(train, test): a seeded half of the PyRIT answers, stratified by label, is the test split."""
    test: list[SourceRow] = []
    train: list[SourceRow] = []
    for kind in ("comply", "safety"):
        part = sorted((r for r in rows if r.kind == kind), key=lambda r: r.group)
        random.Random(SPLIT_SEED).shuffle(part)
        cut = round(len(part) * PYRIT_TEST_SHARE)
        test += part[:cut]
        train += part[cut:]
    return train, test


def uncensorbench_rows() -> list[SourceRow]:
    """Three rows per prompt: the refusal (safety), the compliant answer, and a constructed partial refusal."""
    data = json.loads(_checked(UNCENSORBENCH, UNCENSORBENCH_SHA256).read_text(encoding="utf-8"))
    rows = []
    for p in data["prompts"]:
        refusal, answer = p["censored_response"].strip(), p["uncensored_response"].strip()
        opening, _ = split_head(refusal)
        group, topic, prompt = str(p["id"]), str(p["topic"]), str(p["prompt"])
        rows.append(SourceRow("uncensorbench", group, refusal, "safety", topic=topic, prompt=prompt))
        rows.append(SourceRow("uncensorbench", group, answer, "comply", topic=topic, prompt=prompt))
        rows.append(SourceRow("uncensorbench-partial", group, f"{opening}\n\n{answer}", "partial", topic=topic,
                              prompt=prompt))
    return rows


def uncensorbench_test_topics(rows: list[SourceRow]) -> list[str]:
    topics = sorted({r.topic for r in rows})
    return sorted(random.Random(SPLIT_SEED).sample(topics, TEST_TOPICS))


def partial_variants(rows: list[SourceRow]) -> list[SourceRow]:
    """Two more constructed partial refusals per UncensorBench prompt in ``rows`` (training only): the whole
    refusal then the answer, and the refusal's opening then only the answer's first two sentences."""
    by_group: dict[str, dict[str, str]] = {}
    for r in rows:
        by_group.setdefault(r.group, {})[r.kind] = r.text
    out = []
    for r in rows:
        if r.kind != "partial":
            continue
        texts = by_group[r.group]
        opening, _ = split_head(texts["safety"])
        first, rest = split_head(texts["comply"])
        second = split_head(rest)[0] if rest else ""
        out.append(SourceRow(r.source, r.group, f"{texts['safety']}\n\n{texts['comply']}", "partial",
                             topic=r.topic, prompt=r.prompt))
        out.append(SourceRow(r.source, r.group, f"{opening} {first} {second}".strip(), "partial",
                             topic=r.topic, prompt=r.prompt))
    return out


PROJECT_SOURCES = {"train": "distillgate-train", "heldout": "distillgate-heldout",
                   "chatstyle_train": "distillgate-chatstyle"}
CHATSTYLE_PROBE_CSV = REFUSAL_DIR / "chatstyle_probe.csv"
#: sources whose labels were not made here (PyRIT's annotators, UncensorBench's authors): the pooled public figure
AUTHOR_LABELLED = ("pyrit", "uncensorbench")


def project_rows(name: str) -> list[SourceRow]:
    """``data/refusal/<name>.csv`` (``train``, ``heldout`` or ``chatstyle_train``) as rows of its
    ``PROJECT_SOURCES`` source."""
    labelled = read_labelled_rows(REFUSAL_DIR / f"{name}.csv")
    return [SourceRow(PROJECT_SOURCES[name], f"dg-{name}-{i}", t, k)
            for i, (t, k) in enumerate(zip(labelled.texts, labelled.kinds, strict=True))]


def write_rows(path: Path, rows: list[SourceRow]) -> None:
    """A labelled CSV (``refusal_agreement.read_labelled_rows`` reads it back)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "source", "labels", "topic", "kind", "prompt", "text"])
        for i, r in enumerate(rows):
            w.writerow([f"{r.source}-{i:03d}", r.source, r.labels, r.topic, r.kind, r.prompt, r.text])
