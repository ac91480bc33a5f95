"""``distillgate review serve``: the review web page for one dataset working copy (see docs/review-web.md)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from distillgate.cli.common import db_option


@click.command("serve")
@click.option("--dataset", "dataset", default=lambda: os.environ.get("DISTILLGATE_DATASET", "."),
              show_default="$DISTILLGATE_DATASET or .", type=click.Path(file_okay=False, exists=True),
              help="Dataset working copy to review.")
@db_option
@click.option("--policy", "policy", required=True, type=click.Path(exists=True),
              help="Policy file or directory; review.reviewers says who may review the project.")
@click.option("--project", required=True, help="The project the dataset belongs to (judged by the policy).")
@click.option("--run", "run", default=None, help="Run the reviews are recorded under. [default: dataset dir name]")
@click.option("--requester", default=None, help="Who started the run (a policy with review.required forbids "
              "self-review).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8090, show_default=True, help="Port to bind.")
@click.option("--session-ttl", "session_ttl", type=float, default=8 * 3600, show_default=True,
              help="Seconds a sign-in lasts.")
@click.option("--lease-ttl", "lease_ttl", type=float, default=300, show_default=True,
              help="Seconds a reviewer holds a row they opened.")
def serve(dataset: str, db: str, policy: str, project: str, run: str | None, requester: str | None, host: str,
          port: int, session_ttl: float, lease_ttl: float) -> None:
    """Serve the review page: sign in with a reviewer account or an API key, work the queues, every verdict logged."""
    from distillgate.db import is_postgres
    from distillgate.policy.model import load_policies
    from distillgate.web import ReviewSite
    from distillgate.web import serve as run_site

    site = ReviewSite(dataset=Path(dataset), db=db if is_postgres(db) else Path(db), policies=load_policies(policy), project=project,
                      run=run, requester=requester, session_ttl_s=session_ttl, lease_ttl_s=lease_ttl)
    click.echo(f"distillgate review on http://{host}:{port}/ (dataset {dataset}, project {project}, "
               f"run {site.run_id}, db {db})", err=True)
    run_site(site, host=host, port=port)
