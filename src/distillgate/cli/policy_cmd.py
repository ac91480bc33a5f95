"""``distillgate policy validate | explain | test | show``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from distillgate.errors import ConfigError, ConfigIssue

_SCREENS_HELP = "gateway config whose `screens` the preview runs (default: the gateway's default screens)"


def _gateway_judge(config_path: str | None) -> Any:
    """The gateway's decision path (gateway/judge.py) with the screens `gateway serve` would load."""
    from distillgate.gateway.config import GatewayConfig, load_config
    from distillgate.gateway.judge import preview
    from distillgate.gateway.screens import load_screens

    names = load_config(config_path).screens if config_path else GatewayConfig.model_fields["screens"].get_default(
        call_default_factory=True)
    screens = load_screens(names)
    return lambda policies, data, usage, where: preview(policies, data, usage, screens, where)


@click.group("policy")
def cli() -> None:
    """Validate, explain and test policies."""


@cli.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def validate(paths: tuple[str, ...]) -> None:
    """Check policy files or directories; report every error with its path and a fix (exit 1 on any)."""
    from distillgate.policy.model import load_policies

    issues: list[ConfigIssue] = []
    count = 0
    for path in paths:
        try:
            policies = load_policies(path)
        except ConfigError as exc:
            issues.extend(exc.issues)
            continue
        for policy, source in zip(policies.policies, policies.sources, strict=True):
            count += 1
            click.echo(f"ok  {source}: policy {policy.policy_id!r} (hash {policy.content_hash[:16]}…)")
            for warning in policy.warnings():
                click.echo(f"warning  {source}: {warning}", err=True)
    if issues:
        raise ConfigError(", ".join(paths), issues)
    click.echo(f"{count} polic{'y' if count == 1 else 'ies'} valid")


@cli.command("explain")
@click.option("--policy", "policy_path", required=True, type=click.Path(), help="policy file or directory")
@click.option("--request", "request_path", required=True, type=click.Path(),
              help="request JSON: policy_user, policy_project_id, policy_run_id, policy_output_type, model, ...")
@click.option("--usage", "usage_json", default=None,
              help='usage so far, e.g. \'{"tokens_today_project": 1000}\' (keys: tokens_today_project, '
                   'tokens_today_user, records_run, run_project)')
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), help=_SCREENS_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the decision as JSON")
def explain(policy_path: str, request_path: str, usage_json: str | None, config_path: str | None,
            as_json: bool) -> None:
    """Print the decision the gateway would make for one request, and why (the gateway's own path: parsing,
    prompt screens, defaults, policy). Exit 0 when allowed, 2 when denied."""
    from distillgate.policy.model import load_policies, parse_document
    from distillgate.policy.reasons import REASONS
    from distillgate.policy.testing import parse_usage

    policies = load_policies(policy_path)
    data = parse_document(Path(request_path))
    if not isinstance(data, dict):
        raise ConfigError(request_path, [ConfigIssue("", "the request must be a JSON object")])
    try:
        usage_data = json.loads(usage_json) if usage_json else None
    except json.JSONDecodeError as exc:
        raise ConfigError("--usage", [ConfigIssue("", f"not JSON: {exc.msg}",
                                                  'e.g. --usage \'{"tokens_today_project": 1000}\'')]) from exc
    usage = parse_usage(usage_data, "--usage")
    decision = _gateway_judge(config_path)(policies, data, usage, request_path)
    if as_json:
        click.echo(json.dumps(decision.as_dict(), indent=2))
    else:
        verdict = "ALLOW" if decision.allowed else "DENY"
        click.echo(f"{verdict} under policy {decision.policy_id!r} (hash {decision.policy_hash[:16]}…), "
                   f"HTTP {decision.status}")
        for code in decision.reasons:
            info = REASONS[code]
            detail = next((d.split(": ", 1)[1] for d in decision.details if d.startswith(code + ":")), "")
            click.echo(f"  {code}: {info.description}")
            if detail:
                click.echo(f"      {detail}")
            if info.fix and info.blocking:
                click.echo(f"      fix: {info.fix}")
    if not decision.allowed:
        sys.exit(2)


@cli.command("test")
@click.argument("path", type=click.Path())
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), help=_SCREENS_HELP)
@click.option("-v", "--verbose", is_flag=True)
def test(path: str, config_path: str | None, verbose: bool) -> None:
    """Run policy test cases (request + expected decision) from DIR through the gateway's decision path; exit 1
    if any fails or a test file has an unknown key."""
    from distillgate.policy.testing import run_dir

    results = run_dir(path, _gateway_judge(config_path))
    failed = [r for r in results if not r.passed]
    for r in results:
        if verbose or not r.passed:
            click.echo(f"{'PASS' if r.passed else 'FAIL'}  {r.file}: {r.name}")
            for f in r.failures:
                click.echo(f"      {f}")
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        sys.exit(1)


@cli.command("show")
@click.argument("path", type=click.Path())
def show(path: str) -> None:
    """Print a policy with every default filled in, and its content hash."""
    from distillgate.policy.model import load_policies

    for policy in load_policies(path):
        click.echo(json.dumps({"content_hash": policy.content_hash, **policy.model_dump(mode="json")}, indent=2))
