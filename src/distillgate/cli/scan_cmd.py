"""``distillgate audit scan``: re-run the extraction detectors over a stored decision log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from distillgate.cli.common import db_option
from distillgate.db import is_postgres


@click.command("scan")
@db_option
@click.option("--policy", "policy_path", type=click.Path(), default=None,
              help="policy file or directory whose `extraction` rules apply (default: the built-in defaults)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def scan(db: str, policy_path: str | None, as_json: bool) -> None:
    """Print suspicious sessions (user / key / project / run) with their evidence; exit 2 when any is found."""
    from distillgate.errors import NotFoundError
    from distillgate.extraction.scan import scan_store
    from distillgate.policy.model import load_policies

    if not is_postgres(db) and not Path(db).exists():
        raise NotFoundError(f"no store at {db}", hint="pass --db PATH (or postgresql:// URL) of the gateway's store")
    policies = load_policies(policy_path) if policy_path else None
    report = scan_store(db, policies)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        click.echo(f"scanned {report.entries} decisions ({report.replayed} with extraction records): "
                   f"{len(report.sessions)} suspicious session(s)")
        for s in report.sessions:
            live = " (also flagged live)" if s.live else ""
            click.echo(f"- {s.scope} {s.scope_id!r}: first flagged at log index {s.first_index} after "
                       f"{s.requests_seen} requests{live}")
            for sig in sorted(s.signals.values(), key=lambda x: x.name):
                click.echo(f"    {sig.describe()}  evidence: {json.dumps(sig.evidence, sort_keys=True)}")
    if report.sessions:
        sys.exit(2)
