"""Crafted traffic for the extraction tests: real banking77 / XSTest prompts and scripted attackers."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

from distillgate.extraction import RequestFeatures

DATA = Path(__file__).resolve().parent.parent / "data"
BANK_TEMPLATE = ("Classify this banking customer message into one of the 77 intents. Answer with the label only.\n"
                 "Message: {}")


def banking_texts(split: str = "train") -> list[str]:
    with open(DATA / "banking77" / f"{split}.csv", newline="", encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


def shuffled_bank() -> list[str]:
    """banking77's train texts in one fixed shuffled order (seed 11): tests take disjoint slices of it as approved
    reference text and as a legitimate user's traffic."""
    texts = banking_texts()
    random.Random(11).shuffle(texts)
    return texts


def xstest_prompts() -> list[str]:
    with open(DATA / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8") as fh:
        return [row["prompt"] for row in csv.DictReader(fh)]


def feat(prompt: str, *, user: str = "alice", key: str = "k-alice", project: str = "bank", run: str = "r1",
         **kw: Any) -> RequestFeatures:
    return RequestFeatures(ts=kw.pop("ts", 0.0), user=user, key_id=key, project=project, run=run,
                           model="local/smollm2", output_type=kw.pop("output_type", "labels"), prompt=prompt, **kw)


def legit_banking(n: int, seed: int = 0, **kw: Any) -> list[RequestFeatures]:
    rng = random.Random(seed)
    return [feat(BANK_TEMPLATE.format(t), max_tokens=8, **kw) for t in rng.sample(banking_texts(), n)]


CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Quito", "Accra", "Hanoi", "Rome", "Doha", "Riga"]
TOPICS = ["weather", "history", "population", "economy", "cuisine", "music", "sports", "architecture", "climate"]


def template_sweep(n: int, **kw: Any) -> list[RequestFeatures]:
    out = []
    for i in range(n):
        city, topic = CITIES[i % len(CITIES)], TOPICS[(i // len(CITIES)) % len(TOPICS)]
        out.append(feat(f"Describe the {topic} of {city} in three sentences for a travel guide.", **kw))
    return out


FIELDS = ["quantum physics", "french cooking", "maritime law", "baroque music", "volcanology", "tax accounting",
          "medieval poetry", "organic chemistry", "football tactics", "bird migration", "cloud computing",
          "ancient egypt", "knitting patterns", "jazz harmony", "plate tectonics", "wine tasting"]
ASKS = ["Write a detailed essay on", "List ten surprising facts about", "Draft an exam question covering",
        "Summarise the main debates in", "Compose a short story involving", "Give a beginner's glossary for",
        "Compare two schools of thought in", "Create a lesson plan introducing"]


def coverage_prompts(n: int, seed: int = 1) -> list[str]:
    """Coverage-seeking prompts across unrelated domains (not banking)."""
    rng = random.Random(seed)
    return [f"{rng.choice(ASKS)} {rng.choice(FIELDS)}, with emphasis on {rng.choice(FIELDS)} ({i})." for i in range(n)]
