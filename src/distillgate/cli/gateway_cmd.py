"""``distillgate gateway serve``: the policy gateway over HTTP.

Flags work on their own (``--policy``, ``--upstream NAME=BASE_URL``, ``--db``, ``--host``, ``--port``); with
``--config gateway.yaml`` they override the file's values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from distillgate.cli.common import default_db
from distillgate.errors import ConfigError, ConfigIssue
from distillgate.gateway.config import config_from_data
from distillgate.policy.model import parse_document


def gateway_document(config_path: str | None, upstreams: tuple[str, ...]) -> dict[str, Any]:
    """The gateway configuration as data: ``--config``'s file (if any) with ``--upstream NAME=BASE_URL`` merged in
    (shared by ``gateway serve`` and ``dataset generate``'s in-process gateway)."""
    data: dict[str, Any] = {}
    if config_path:
        loaded = parse_document(Path(config_path))
        if not isinstance(loaded, dict):
            raise ConfigError(config_path, [ConfigIssue("", "must be a mapping", "start with policy: ...")])
        data = loaded
    ups = dict(data.get("upstreams") or {})
    for name, url in _pairs(upstreams, "--upstream", "NAME=BASE_URL").items():
        ups[name] = {**(ups.get(name) or {}), "base_url": url}
    if ups:
        data["upstreams"] = ups
    return data


def _pairs(values: tuple[str, ...], option: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    issues = []
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            issues.append(ConfigIssue(option, f"{v!r} is not {what}", f"write it like {option} {what}"))
        else:
            out[name] = rest
    if issues:
        raise ConfigError("command line", issues)
    return out


@click.group("gateway")
def cli() -> None:
    """Serve the OpenAI-compatible policy gateway."""


@cli.command("serve")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="gateway.yaml (see docs/gateway.md); the flags below override it.")
@click.option("--policy", "policy", default=None, help="Policy file or directory.")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=BASE_URL",
              help="An OpenAI-compatible upstream, e.g. openai=https://api.openai.com/v1 (repeatable).")
@click.option("--upstream-key-env", "key_envs", multiple=True, metavar="NAME=ENV_VAR",
              help="Environment variable holding the upstream's API key (repeatable).")
@click.option("--model", "models", multiple=True, metavar="PATTERN=UPSTREAM",
              help="Route model names matching PATTERN (glob) to UPSTREAM (repeatable).")
@click.option("--db", default=None, help="Store (quotas, decision log, API keys): a SQLite file or a postgresql:// URL. "
              "[default: $DISTILLGATE_DB or ./distillgate.db]")
@click.option("--host", default=None, help="Address to bind. [default: 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Port to bind. [default: 8080]")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Worker processes on the one port (each its own event loop; quotas and the extraction "
              "monitor's windows are shared through --db). [default: workers: in --config, else 1]")
@click.option("--check", is_flag=True, help="Validate the configuration, print it, and exit.")
def serve(config_path: str | None, policy: str | None, upstreams: tuple[str, ...], key_envs: tuple[str, ...],
          models: tuple[str, ...], db: str | None, host: str | None, port: int | None, workers: int | None,
          check: bool) -> None:
    """Run the gateway (uvicorn, uvloop, httptools) until interrupted."""
    data = gateway_document(config_path, upstreams)
    ups = dict(data.get("upstreams") or {})
    for name, env in _pairs(key_envs, "--upstream-key-env", "NAME=ENV_VAR").items():
        if name not in ups:
            raise ConfigError("command line", [ConfigIssue("--upstream-key-env", f"no upstream named {name!r}",
                                                           "add --upstream NAME=BASE_URL first")])
        ups[name] = {**ups[name], "api_key_env": env}
    if ups:
        data["upstreams"] = ups
    if models:
        data["models"] = {**(data.get("models") or {}), **_pairs(models, "--model", "PATTERN=UPSTREAM")}
    for key, value in (("policy", policy), ("db", db), ("host", host), ("port", port), ("workers", workers)):
        if value is not None:
            data[key] = value
    data.setdefault("db", default_db())
    if "policy" not in data:
        raise ConfigError("command line", [ConfigIssue("--policy", "no policy given",
                                                       "pass --policy FILE_OR_DIR or set policy: in --config")])
    config = config_from_data(data, config_path or "command line")
    if check:
        click.echo(config.model_dump_json(indent=2))
        return
    from distillgate.gateway.server import serve as run_server

    click.echo(f"distillgate gateway on http://{config.host}:{config.port}/v1 "
               f"(policy {config.policy}, db {config.db}, upstreams {', '.join(config.upstreams) or 'none'})",
               err=True)
    run_server(config)
