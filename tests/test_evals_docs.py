"""docs/evaluation.md cannot drift: every option of eval/refusal/route and every threshold field is documented."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from distillgate.cli import eval_cmd, refusal_cmd, route_cmd
from distillgate.evals.routing import RouteThreshold

DOC = (Path(__file__).resolve().parent.parent / "docs" / "evaluation.md").read_text(encoding="utf-8")


def commands():
    yield "eval", eval_cmd.cli
    for group in (refusal_cmd.cli, route_cmd.cli):
        assert isinstance(group, click.Group)
        for name, command in group.commands.items():
            yield f"{group.name} {name}", command


@pytest.mark.parametrize(("name", "command"), list(commands()))
def test_every_option_is_documented(name, command):
    assert f"distillgate {name}" in DOC
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in param.opts:
                assert opt in DOC, f"{name}: option {opt} is not in docs/evaluation.md"


def test_every_threshold_field_is_documented():
    for field in RouteThreshold.model_fields:
        assert f'"{field}"' in DOC, f"threshold field {field} is not in docs/evaluation.md"


def test_promote_options_and_gates_are_documented():
    from distillgate.cli import promote_cmd
    from distillgate.policy.promotion_rules import PromotionRules

    assert "distillgate promote" in DOC
    for param in promote_cmd.cli.params:
        if isinstance(param, click.Option):
            for opt in param.opts:
                assert opt in DOC, f"promote: option {opt} is not in docs/evaluation.md"
    policy_doc = (Path(__file__).resolve().parent.parent / "docs" / "policy.md").read_text(encoding="utf-8")
    for field in PromotionRules.model_fields:
        assert f"`promotion.{field}`" in policy_doc, f"promotion.{field} is not in docs/policy.md"
