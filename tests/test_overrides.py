"""``key.path=value`` overrides: one parser for project files, training configs and dataset configs."""

from __future__ import annotations

import pytest

from distillgate.errors import ConfigError
from distillgate.overrides import apply_overrides


def test_values_are_yaml_keys_are_dotted_and_lists_take_indices() -> None:
    doc = {"train": {"epochs": 1}, "suites": ["banking77"], "name": "x"}
    out = apply_overrides(doc, ["train.epochs=3", "train.kd.temperature=2.5", "suites.1=xstest", "suites.0=b",
                                "name=null", "flag=true", "labels=[a, b]"])
    assert out == {"train": {"epochs": 3, "kd": {"temperature": 2.5}}, "suites": ["b", "xstest"], "name": None,
                   "flag": True, "labels": ["a", "b"]}
    assert doc["train"] == {"epochs": 1}  # the input is not changed


def test_every_bad_override_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"name": "x", "suites": []}, ["epochs", "=3", "name.first=a", "suites.5=x", "a..b=1",
                                                      "ok=1"])
    messages = [f"{i.path}: {i.message}" for i in info.value.issues]
    assert len(messages) == 5
    assert any("key.path=value" in m for m in messages) and any("empty key" in m for m in messages)
    assert any("name: is not a mapping" in m for m in messages) and any("no list item 5" in m for m in messages)


def test_training_configs_report_bad_overrides_with_their_other_problems(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from distillgate.train.config import parse_config

    with pytest.raises(ConfigError) as info:
        parse_config({"student": {"path": str(tmp_path)}}, "train.yaml", ["epochs"])
    paths = {i.path for i in info.value.issues}
    assert "epochs" in paths and len(paths) > 1  # the override and the schema's own problems, together
