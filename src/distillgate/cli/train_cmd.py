"""``distillgate train``: validate a training config, run the sft / kd recipe on it."""

from __future__ import annotations

import json
import os

import click


@click.group(name="train")
def cli() -> None:
    """Train a student (SFT or KD) from a frozen dataset version's rows."""


def _load(config_path: str, overrides: tuple[str, ...]) -> object:
    from distillgate.train import load_config

    return load_config(config_path, list(overrides))


@cli.command("validate")
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate(config_path: str, overrides: tuple[str, ...]) -> None:
    """Check CONFIG_PATH (with key=value OVERRIDES) and print the resolved config as JSON."""
    from distillgate.train import TrainConfig

    config = _load(config_path, overrides)
    assert isinstance(config, TrainConfig)
    click.echo(json.dumps(config.model_dump(mode="json"), indent=2))


@cli.command("run")
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--policy", "policy_path", default=None, type=click.Path(exists=True),
              help="Govern the training: judged by this policy (with review.required, the version's sign-off) "
              "and logged; needs --db, --project, --run, --user.")
@click.option("--db", default=None, type=click.Path(dir_okay=False), help="The study's decision log.")
@click.option("--project", default=None, help="The study's project.")
@click.option("--run", "run_id", default=None, help="The study's run (whose sign-offs count).")
@click.option("--user", default=None, help="Who trains (recorded in the log).")
def run(config_path: str, overrides: tuple[str, ...], policy_path: str | None, db: str | None,
        project: str | None, run_id: str | None, user: str | None) -> None:
    """Run the recipe CONFIG_PATH names; OVERRIDES are key=value (e.g. epochs=2 kd.temperature=2)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillgate.errors import UserError
    from distillgate.train import TrainConfig, run_recipe

    config = _load(config_path, overrides)
    assert isinstance(config, TrainConfig)
    governed = None
    if policy_path is not None:
        if not (db and project and run_id and user):
            raise UserError("--policy needs --db, --project, --run and --user",
                            hint="name the study whose sign-off covers this training")
        from distillgate.ledger.store import Store
        from distillgate.policy.model import load_policies
        from distillgate.train.export import judge_training

        with Store.open(db) as store:
            governed = judge_training(store, load_policies(policy_path), config, user=user, project=project,
                                      run=run_id)
    click.echo("resolved config:\n" + json.dumps(config.model_dump(mode="json"), indent=2), err=True)
    result = run_recipe(config)
    if governed is not None:
        assert db and project and run_id
        from distillgate.ledger.store import Store
        from distillgate.train.export import student_card

        record = json.loads(result.record_path.read_text())
        with Store.open(db) as store:
            record["provenance"] = student_card(store, project=project, run=run_id, version_id=governed[0],
                                                decision_index=governed[1])
        result.record_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    click.echo(json.dumps({
        "model_dir": str(result.model_dir), "run_record": str(result.record_path), "steps": result.steps,
        "final_loss": round(result.final_loss, 6), "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_second, 2), "train_seconds": round(result.seconds, 2),
    }))


@cli.command("export")
@click.argument("train_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--to", "to_url", required=True, help="file:///dir/ or s3://bucket/prefix/ (an approved destination).")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help="The study's decision log.")
@click.option("--policy", "policy_path", required=True, type=click.Path(exists=True), help="Policy file or directory.")
@click.option("--user", required=True, help="Who exports (recorded in the log).")
@click.option("--project", default=None, help="Project of the run [default: from run.json].")
@click.option("--run", "run_id", default=None, help="Run whose sign-offs count [default: from run.json].")
def export(train_dir: str, to_url: str, db: str, policy_path: str, user: str, project: str | None,
           run_id: str | None) -> None:
    """Export the student in TRAIN_DIR after the policy approves the destination and the run's sign-off."""
    from distillgate.ledger.store import Store
    from distillgate.policy.model import load_policies
    from distillgate.train.export import export_student

    with Store.open(db) as store:
        urls = export_student(store, load_policies(policy_path), train_dir, to_url, user=user, project=project,
                              run=run_id)
    click.echo(f"exported {len(urls)} files to {to_url}")


for _recipe in ("sft", "kd"):

    def _make(recipe: str) -> click.Command:
        @click.command(recipe, help=f"Run the {recipe} recipe (same as `run` with recipe={recipe}).")
        @click.argument("config_path", type=click.Path(dir_okay=False))
        @click.argument("overrides", nargs=-1)
        @click.pass_context
        def _cmd(ctx: click.Context, config_path: str, overrides: tuple[str, ...]) -> None:
            ctx.invoke(run, config_path=config_path, overrides=(f"recipe={recipe}", *overrides))

        return _cmd

    cli.add_command(_make(_recipe))
