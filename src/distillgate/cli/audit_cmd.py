"""``distillgate audit verify | export | checkpoint | pubkey | log``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from distillgate.cli.common import db_option
from distillgate.cli.scan_cmd import scan as scan_cmd


@click.group("audit")
def cli() -> None:
    """Verify, checkpoint and export the decision log."""


@cli.command("verify")
@db_option
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False),
              help="trusted public key (PEM) from `audit pubkey`; default: the key recorded in the store")
@click.option("--witness", "witness_paths", multiple=True, type=click.Path(dir_okay=False),
              help="heads seen outside the store: a witness .jsonl (default file: <db>.witness.jsonl) or an "
                   "export's checkpoint.json / manifest.json; repeat for several. Detects a rolled-back log.")
@click.option("--json", "as_json", is_flag=True)
def verify(db: str, public_key: str | None, witness_paths: tuple[str, ...], as_json: bool) -> None:
    """Check the hash chain, entry hashes, columns, Merkle checkpoints, signatures and witnessed heads; exit 2 and
    name the first bad index."""
    from distillgate.ledger.verify import verify_db
    from distillgate.ledger.witness import read_witness

    pem = Path(public_key).read_text() if public_key else None
    witnesses = [w for path in witness_paths for w in read_witness(path)]
    report = verify_db(db, pem, witnesses)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif report.ok:
        head = report.head or {}
        seen = (f"; consistent with {report.witnessed} witnessed heads (largest {report.witnessed_size})"
                if report.witnessed else "; no witness given, so a rollback would not show (see docs/audit.md)")
        click.echo(f"ok: {report.entries} entries, {report.checkpoints_checked} signed checkpoints verified; "
                   f"root {str(head.get('root_hash', ''))[:16]}…{seen}")
    else:
        click.echo(f"FAILED: first bad index {report.first_bad_index}", err=True)
        for problem in report.problems[:20]:
            click.echo(f"  - {problem}", err=True)
        if len(report.problems) > 20:
            click.echo(f"  … {len(report.problems) - 20} more", err=True)
    if not report.ok:
        sys.exit(2)


@cli.command("export")
@db_option
@click.option("--run", required=True, help="policy_run_id to export")
@click.option("--project", default=None, help="the run's project (default: the project that owns the run)")
@click.option("--to", "to_url", required=True, help="file:///dir/ or s3://bucket/prefix/")
@click.option("--policy", "policy_path", required=True, type=click.Path(), help="policy file or directory")
@click.option("--user", default=None, help="who exports (recorded in the log)")
@click.option("--s3-endpoint", default=None, help="S3 endpoint URL (else $DISTILLGATE_S3_ENDPOINT)")
def export(db: str, run: str, project: str | None, to_url: str, policy_path: str, user: str | None,
           s3_endpoint: str | None) -> None:
    """Write the run's decisions (JSONL + Parquet), a signed checkpoint with proofs and a manifest."""
    from distillgate.ledger.export import export_run
    from distillgate.ledger.store import Store
    from distillgate.policy.model import load_policies

    policies = load_policies(policy_path)
    with Store.open(db) as store:
        result = export_run(store, policies, run, to_url, user=user, project=project, endpoint_url=s3_endpoint)
    click.echo(f"exported {result.entries} entries of run {run!r}:")
    for url in result.urls:
        click.echo(f"  {url}")


@cli.command("checkpoint")
@db_option
def checkpoint(db: str) -> None:
    """Sign a checkpoint of the log now and print it."""
    from distillgate.ledger.store import Store

    with Store.open(db) as store:
        cp = store.checkpoint()
    click.echo(json.dumps(cp.as_dict(), indent=2))


@cli.command("pubkey")
@db_option
def pubkey(db: str) -> None:
    """Print the public key that verifies this store's checkpoints and stamps."""
    from distillgate.ledger.store import Store

    with Store.open(db) as store:
        click.echo(store.signer.public_key_pem(), nl=False)


@cli.command("log")
@db_option
@click.option("--run", default=None)
@click.option("--project", default=None, help="only entries of this project")
@click.option("--limit", default=20, show_default=True)
def log(db: str, run: str | None, project: str | None, limit: int) -> None:
    """Print the last entries of the log (optionally of one run) as JSON lines."""
    from distillgate.ledger.store import Store

    with Store.open(db) as store:
        entries = list(store.entries(run=run, project=project))
    for e in entries[-limit:]:
        click.echo(json.dumps(e.as_dict(), sort_keys=True))


@cli.command("trace")
@click.argument("student", type=click.Path(exists=True))
@db_option
@click.option("--json", "as_json", is_flag=True)
def trace_cmd(student: str, db: str, as_json: bool) -> None:
    """Walk from a trained STUDENT (its training output directory) back to the signed decisions behind every row
    it trained on and the sign-offs of its dataset version; exit 2 when a row has none or nobody signed off."""
    from distillgate.ledger.store import Store
    from distillgate.pipeline.trace import trace

    with Store.open(db) as store:
        result = trace(student, store)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
    else:
        click.echo(f"student {result.student}: dataset version {result.version_id[:16]}, {result.rows} rows, "
                   f"{result.decisions} teacher-call decisions")
        for s in result.signed_off_by:
            click.echo(f"  signed off by {s['reviewer']} at {s['signed_at']} (log entry {s['index']})")
        if not result.signed_off_by:
            click.echo("  no sign-off of this version")
        click.echo(f"rows without a signed decision: {len(result.broken)}")
        for row_id, why in result.broken[:20]:
            click.echo(f"  - {row_id}: {why}")
    if not result.ok:
        sys.exit(2)


cli.add_command(scan_cmd)
