"""docs/training.md cannot drift: every config key and every CLI verb is documented."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from distillgate.cli.train_cmd import cli
from distillgate.train.config import TrainConfig

DOC = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        for cand in getattr(ann, "__args__", (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                keys.extend(_keys(cand, prefix + name + "."))
    return keys


def test_every_config_key_is_documented() -> None:
    missing = [k for k in _keys(TrainConfig) if k.rsplit(".", 1)[-1] not in DOC]
    assert not missing, f"document these keys in docs/training.md: {missing}"


def test_every_cli_verb_is_documented() -> None:
    for verb in cli.commands:
        assert f"distillgate train {verb}" in DOC
