"""The "Generate" section of docs/dataset.md cannot drift: every option, template field and summary key is there."""

from __future__ import annotations

from pathlib import Path

import click

from distillgate.cli.generate_cmd import generate as generate_cmd
from distillgate.data.generate import TEMPLATE_FIELDS, GenerateReport, GenerateSettings

DOC = (Path(__file__).resolve().parent.parent / "docs" / "dataset.md").read_text()
SECTION = DOC.split("## Generate", 1)[1].split("\n## ", 1)[0]


def test_every_option_is_documented() -> None:
    missing = [opt for p in generate_cmd.params if isinstance(p, click.Option) for opt in p.opts
               if opt.startswith("--") and f"`{opt}" not in SECTION and f", `{opt}" not in SECTION
               and f"{opt}`" not in SECTION and f" {opt}" not in SECTION]
    assert not missing


def test_every_template_field_and_summary_key_is_documented() -> None:
    assert all(f"`{{{f}}}`" in SECTION for f in TEMPLATE_FIELDS)
    assert "`{labels}`" in SECTION
    assert all(f"`{key}`" in SECTION for key in GenerateReport().as_dict())


def test_sampling_keys_are_documented() -> None:
    sampling = GenerateSettings(model="m", user="u", project="p", run="r", output_type="o").sampling(0)
    assert all(f"`{key}`" in SECTION for key in [*sampling, "finish_reason"])
