"""docs/dataset.md cannot drift: every reason code, config key, row field and CLI verb is documented."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from distillgate.cli.dataset_cmd import cli as dataset_cli
from distillgate.cli.review_cmd import cli as review_cli
from distillgate.data.config import DatasetConfig
from distillgate.data.filters import REASONS
from distillgate.data.schema import FIELD_NAMES

DOC = (Path(__file__).resolve().parent.parent / "docs" / "dataset.md").read_text()


def _keys(model: type[BaseModel]) -> set[str]:
    out: set[str] = set()
    for name, info in model.model_fields.items():
        out.add(name)
        for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
            for inner in (arg, *getattr(arg, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    out |= _keys(inner)
    return out


def test_every_reason_code_is_documented():
    missing = [code for code in REASONS if f"`{code}`" not in DOC]
    assert not missing


def test_every_config_key_is_documented():
    keys = _keys(DatasetConfig)
    assert {"min_agreement", "long_input_quantile", "allowed_destinations", "plain_label"} <= keys
    missing = sorted(k for k in keys if f"{k}:" not in DOC and f"`{k}`" not in DOC)
    assert not missing


def test_every_row_field_is_documented():
    missing = [f for f in FIELD_NAMES if f"`{f}`" not in DOC]
    assert not missing


def test_every_cli_verb_is_documented():
    for group, noun in ((dataset_cli, "dataset"), (review_cli, "review")):
        for verb in group.commands:
            assert f"{verb}" in DOC.split(f"`{noun} ", 1)[1].split("`", 1)[0], (noun, verb)
