"""Fixtures for the synthetic-data tests: seed working copies and a gateway with a writer and a labeller teacher.

Two fake teachers behind one real gateway: ``fake-teacher-large`` (the writer) echoes its prompt's first line, so a
synthetic message is ``Echo: <seed message>``; ``fake-teacher`` (the labeller) answers ``card_lost`` to everything.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _gateway_support import free_port, serve_in_thread, write_policies
from distillgate.data.generate import GatewayTarget, GenerateSettings, PromptTemplate, parse_settings
from distillgate.data.schema import Row, make_row_id, text_sha256
from distillgate.data.store import WorkingCopy
from distillgate.gateway.config import config_from_data
from distillgate.gateway.server import build_gateway
from distillgate.keys import KeyStore

from fakes.fake_upstream import FakeUpstream, fake_upstream

DATA = Path(__file__).resolve().parent.parent / "data"
LABELS = ["card_lost", "top_up_failed", "card_arrival"]
POLICY: dict[str, Any] = {
    "policy_id": "synth",
    "allowed_projects": ["proj-a"],
    "allowed_outputs": ["labels", "synthetic_records"],
    "quotas": {"tokens_per_day": 1_000_000, "records_per_run": 1000, "default_max_tokens": 64},
    "approved_models": ["fake-teacher", "fake-teacher-large"],
    "output_contracts": {"labels": {"labels": LABELS, "enforcement": "block"}},
    "audit": {"log_content": True},
}
LABEL_TEMPLATE = PromptTemplate(id="intent-v1", system="You label banking messages.", user="Message: {input}")
CONFIG: dict[str, Any] = {"name": "synth", "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 1,
                                                     "golden": {"fraction": 0.0}, "holdout": {"enabled": False}}}


def label_settings(**over: Any) -> GenerateSettings:
    base: dict[str, Any] = {"model": "fake-teacher", "user": "alice", "project": "proj-a", "run": "syn-1",
                            "output_type": "labels", "labels": LABELS, "concurrency": 2, "backoff_s": 0.01,
                            "max_tokens": 8}
    return parse_settings({**base, **over})


def banking_texts(n: int, offset: int = 0) -> list[str]:
    """Real banking77 training messages (PolyAI, CC BY 4.0)."""
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        return [r["text"] for i, r in enumerate(csv.DictReader(f)) if offset <= i < offset + n]


def seed_row(i: int, text: str, label: str, probs: dict[str, float] | None = None, **extra: Any) -> Row:
    """A real row whose teacher answer came with the traffic (label ``label``, distribution ``probs``)."""
    iid = f"real-{i:03d}"
    return Row(row_id=make_row_id(iid, 0), input_id=iid, input=text, output_raw=label, teacher_model="imported",
               label_probs=probs, source_file="traffic.csv", source_record_id=str(i), input_sha256=text_sha256(text),
               **extra)


def seeded_copy(root: Path, n: int = 30, config: dict[str, Any] | None = None) -> Path:
    """A working copy of ``n`` real rows labelled round-robin, each with a three-label distribution."""
    rows = []
    for i, text in enumerate(banking_texts(n)):
        label = LABELS[i % 3] if i % 5 else "card_lost"  # card_lost is over-represented
        others = [lab for lab in LABELS if lab != label]
        second = 0.2 + 0.01 * (i % 10)  # margins differ: the smallest first
        rows.append(seed_row(i, text, label, {label: 0.7 - 0.01 * (i % 10), others[i % 2]: second,
                                              others[(i + 1) % 2]: 0.1}))
    with WorkingCopy.create(root, config or CONFIG) as wc:
        wc.add_inputs(rows)
    return root


@dataclass
class TwoTeachers:
    target: GatewayTarget
    writer: FakeUpstream
    labeller: FakeUpstream
    gateway: Any

    def log(self) -> list[dict[str, Any]]:
        return [e.body | {"index": e.index} for e in self.gateway.store.entries()]


@contextlib.contextmanager
def two_teachers(tmp: Path, policy: dict[str, Any] | None = None) -> Iterator[TwoTeachers]:
    policies = write_policies(tmp / "policies", policy or POLICY)
    db = tmp / "gw.db"
    keystore = KeyStore(db)
    key = keystore.create("alice")[1]
    keystore.close()
    with fake_upstream() as writer, fake_upstream() as labeller:
        labeller.set_reply("card_lost")
        upstream = {"max_retries": 1, "backoff_s": 0.01, "timeout_s": 5.0}
        data = {"policy": str(policies), "db": str(db),
                "upstreams": {"writer": {"base_url": writer.base_url, **upstream},
                              "labeller": {"base_url": labeller.base_url, **upstream}},
                "models": {"fake-teacher-large": "writer", "fake-teacher": "labeller"}}
        gateway = build_gateway(config_from_data(data))
        port = free_port()
        try:
            with serve_in_thread(gateway, port):
                yield TwoTeachers(GatewayTarget(f"http://127.0.0.1:{port}/v1", key), writer, labeller, gateway)
        finally:
            gateway.store.close()
            gateway.keys.close()
