"""``distillgate promote DIR``: promote a trained student only if the policy's gates hold on its evaluations.

    distillgate promote runs/r1 --policy policy.yaml --db study.db --user alice
    distillgate promote runs/r1/train --eval runs/r1/eval/xstest --eval runs/r1/eval/harmful ...

DIR is a training output directory (``run.json`` + ``model/``) or the work directory of ``distillgate run``.
Every gate is printed, pass, fail or skipped, with why; a failed gate exits 2 with its reason codes, logged.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from distillgate.cli.common import db_option
from distillgate.errors import PolicyDenied


def _table(report: Path) -> None:
    data = json.loads(report.read_text(encoding="utf-8"))
    click.echo(f"promotion of run {data['run']!r} (project {data['project']!r}) under policy {data['policy_id']!r}:")
    for gate in data["gates"]:
        code = f" [{gate['code']}]" if gate.get("code") else ""
        click.echo(f"  {gate['status'].upper():7} {gate['gate']:14} {gate['why']}{code}")


@click.command(name="promote")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--policy", "policy_path", required=True, type=click.Path(exists=True), help="Policy file or directory.")
@db_option
@click.option("--user", required=True, help="Who promotes (recorded in the log).")
@click.option("--eval", "evals", multiple=True, type=click.Path(exists=True),
              help="More evaluation folders or metrics.json files of this student (repeatable).")
@click.option("--project", default=None, help="Project of the run [default: from run.json].")
@click.option("--run", "run_id", default=None, help="Run whose sign-offs count [default: from run.json].")
def cli(directory: str, policy_path: str, db: str, user: str, evals: tuple[str, ...], project: str | None,
        run_id: str | None) -> None:
    """Promote the student in DIRECTORY (sign its card, mark it deployable) if every promotion gate holds."""
    from distillgate.evals.promotion import REPORT_FILE, find_student, promote
    from distillgate.ledger.store import Store
    from distillgate.policy.model import load_policies

    policies = load_policies(policy_path)
    report = find_student(Path(directory)) / REPORT_FILE
    with Store.open(db) as store:
        try:
            result = promote(store, policies, directory, user=user, evals=evals, project=project, run=run_id)
        except PolicyDenied:
            if report.is_file():
                _table(report)
            raise
    _table(result.report_path)
    click.echo(f"promoted: {result.record_path} (signed; decision-log index {result.decision_index})")
