"""``distillgate run PROJECT.yaml [key=value ...]``: the whole governed study, end to end."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("run")
@click.argument("project_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--from", "start", default=None, help="Rerun from this stage on (generate, build, freeze, train, "
              "eval, promote, report, export).")
@click.option("--only", default=None, help="Run only this stage (its inputs must exist).")
@click.option("--force", is_flag=True, help="Ignore every cached stage.")
@click.option("--check", is_flag=True, help="Validate the project file (every problem at once) and stop.")
def cli(project_file: str, overrides: tuple[str, ...], start: str | None, only: str | None, force: bool,
        check: bool) -> None:
    """Run a governed distillation study: generate → build → freeze → train → eval → promote → report → export.

    Exit codes: 0 ok, 1 user error, 2 policy denial, 3 internal or upstream error. A student that fails its
    promotion gates is a finding of the report (exit 0) unless the project sets promote.required: true (exit 2).
    """
    from rich.console import Console

    from distillgate.pipeline.project import load_project
    from distillgate.pipeline.run import Pipeline

    project, doc, base = load_project(project_file, list(overrides))
    console = Console(stderr=True)
    if check:
        click.echo(f"ok: project {project.name!r} (run {project.run_id!r}) is valid")
        return
    pipeline = Pipeline(project, doc, base, console=console, project_file=Path(project_file))
    console.print(f"[bold]distillgate run[/] {project.name}: workdir {pipeline.workdir}, store {pipeline.store_path}")
    outcomes = pipeline.run(start=start, only=only, force=force)
    Console().print(pipeline.summary_table(outcomes))
    for name in ("report.html", "metrics.json"):
        path = pipeline.workdir / name
        if path.exists():
            click.echo(f"{name}: {path}")
    click.echo(f"decision log: {pipeline.store_path}  (verify: distillgate audit verify --db {pipeline.store_path})")
    denied = pipeline.promotion_denied()
    if denied is not None:
        raise denied
