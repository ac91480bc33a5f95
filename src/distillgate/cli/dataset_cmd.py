"""``distillgate dataset``: init, ingest, build, leakage, status, freeze, diff, export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import orjson
import yaml

from distillgate.cli.common import db_option
from distillgate.errors import UserError


def _dump(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS, default=str).decode()


def _parse_maps(items: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UserError(f"--map {item!r} is not FIELD=COLUMN", hint="e.g. --map input=text --map group=account")
        out[key] = value
    return out


@click.group()
def cli() -> None:
    """Build distillation datasets: ingest traffic, filter, dedup, review, split, freeze, export."""


@cli.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), help="Dataset config YAML.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (a.b=value).")
def init_cmd(directory: str, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Create a dataset working copy in DIRECTORY."""
    from distillgate.data.store import WorkingCopy
    from distillgate.overrides import apply_overrides

    data: dict[str, Any] = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
    data = apply_overrides(data, list(overrides))
    with WorkingCopy.create(directory, data) as wc:
        click.echo(f"created dataset working copy {wc.root}")


@cli.command("validate")
@click.argument("config_path", type=click.Path(dir_okay=False))
def validate_cmd(config_path: str) -> None:
    """Check a dataset config file; report every problem."""
    from distillgate.data.config import load_config

    cfg = load_config(config_path)
    click.echo(f"{config_path}: ok (dataset {cfg.name!r})")


@cli.command("ingest")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("traffic", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default=None)
@click.option("--map", "maps", multiple=True, metavar="FIELD=COLUMN",
              help="Column mapping (input, record_id, group, timestamp, reference_label, task, tags, output).")
@click.option("--task", default=None, help="Task name for rows without a task column.")
def ingest_cmd(directory: str, traffic: str, fmt: str | None, maps: tuple[str, ...], task: str | None) -> None:
    """Read TRAFFIC (CSV/JSONL/Parquet) into the working copy at DIRECTORY."""
    from distillgate.data.config import ColumnMapping, IngestConfig
    from distillgate.data.ingest import ingest_file
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(directory) as wc:
        base = wc.config.ingest
        columns = ColumnMapping.model_validate({**base.columns.model_dump(), **_parse_maps(maps)})
        cfg = IngestConfig.model_validate(
            {"columns": columns, "format": fmt or base.format, "task": task or base.task}
        )
        result = ingest_file(traffic, cfg)
        new, known = wc.add_inputs(result.rows)
        with_output = sum(1 for r in result.rows if r.output_raw is not None)
        click.echo(f"ingested {len(result.rows)} record(s) from {result.source_file}: {new} new, {known} already "
                   f"present, {result.skipped_empty} empty skipped, {with_output} with teacher output")


@cli.command("build")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def build_cmd(directory: str, as_json: bool) -> None:
    """Normalise, filter, dedup, decontaminate and split the working copy; run the leakage check."""
    from distillgate.data.pipeline import build, summary
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(directory) as wc:
        report = build(wc)
    info = summary(report)
    if as_json:
        click.echo(_dump(info))
        return
    click.echo(f"rows {info['rows']}: {info['passed']} pass, {info['rows'] - info['passed']} fail; "
               f"{info['clusters']} near-duplicate clusters")
    for code, n in info["reasons"].items():
        click.echo(f"  {code}: {n}")
    click.echo("splits: " + ", ".join(f"{k}={v}" for k, v in sorted(info["splits"].items())))
    if info["holdout_reasons"]:
        click.echo("holdout: " + ", ".join(f"{k}={v}" for k, v in sorted(info["holdout_reasons"].items())))
    click.echo(f"leakage: {info['leakage_hits']} protected row(s) with a train neighbour at Jaccard >= "
               f"{report.leakage.threshold}")
    _echo_conflicts(report.leakage.conflicts, limit=5)
    if report.conflicts:
        click.echo(f"warning: {len(report.conflicts)} row(s) changed by a reviewer during the build were left "
                   "as they are; run build again", err=True)


def _echo_conflicts(conflicts: list[Any], limit: int) -> None:
    across = sum(c.across_splits for c in conflicts)
    set_aside = sum(not c.in_use for c in conflicts)
    click.echo(f"label conflicts: {len(conflicts)} text(s) with more than one label ({across} across splits"
               + (f", {set_aside} resolved by excluded copies" if set_aside else "") + ")")
    for c in conflicts[: limit or None]:
        labels = "; ".join(f"{label}: {', '.join(f'{r} [{s}]' for r, s in members[:3])}"
                           + (f" +{len(members) - 3}" if len(members) > 3 else "")
                           for label, members in c.rows.items())
        click.echo(f"  {c.field} {c.text[:60]!r}: {labels}")


@cli.command("leakage")
@click.argument("ref", required=False)
@click.option("--train", "train_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A published train file (with --test): check the dataset's own split, not the builder's.")
@click.option("--test", "test_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The published test file that goes with --train.")
@click.option("--map", "maps", multiple=True, metavar="FIELD=COLUMN",
              help="With --train/--test: input=COLUMN (default text), label=COLUMN (default label).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default=None)
@click.option("--threshold", type=float, default=None, help="Jaccard threshold (default: dedup.threshold).")
@click.option("--limit", type=int, default=50, show_default=True, help="Hits and conflicts to list (0: all).")
@click.option("--strict", is_flag=True, help="Exit 2 when any protected row has a train neighbour or any text "
              "carries two labels.")
@click.option("--json", "as_json", is_flag=True)
def leakage_cmd(ref: str | None, train_file: str | None, test_file: str | None, maps: tuple[str, ...],
                fmt: str | None, threshold: float | None, limit: int, strict: bool, as_json: bool) -> None:
    """Report test/golden/holdout rows with a train neighbour, and texts carrying two labels.

    REF is a working copy dir or a version; or give a dataset's published split as --train FILE --test FILE.
    """
    from distillgate.data.config import DatasetConfig, DedupConfig, parse_config
    from distillgate.data.leakage import leakage_check, published_split_rows
    from distillgate.data.store import WorkingCopy
    from distillgate.data.versions import open_version
    from distillgate.errors import IntegrityError

    rows: list[Any]
    dedup = DedupConfig()
    fields: tuple[str, ...] = ("label", "reference_label")
    if (train_file is None) != (test_file is None):
        raise UserError("--train and --test go together", hint="e.g. --train data/x/train.csv --test data/x/test.csv")
    if train_file is not None and test_file is not None:
        if ref is not None:
            raise UserError("give either REF or --train/--test, not both")
        columns = {"input": "text", "label": "label", **_parse_maps(maps)}
        unknown = sorted(set(columns) - {"input", "label"})
        if unknown:
            raise UserError(f"--map names unknown field(s) {unknown}", hint="use --map input=COL --map label=COL")
        rows = published_split_rows({"train": train_file, "test": test_file}, input_column=columns["input"],
                                    label_column=columns["label"], fmt=fmt)
        fields = ("label",)
    elif ref is None:
        raise UserError("nothing to check", hint="give a working copy / version REF, or --train FILE --test FILE")
    else:
        cfg: DatasetConfig
        if (Path(ref) / "working.sqlite").exists():
            with WorkingCopy.open(ref) as wc:
                rows, cfg = wc.rows(), wc.config
        else:
            version = open_version(ref)
            rows, cfg = version.rows, parse_config(version.manifest.get("config", {}), "manifest")
        dedup = cfg.dedup
    if threshold is not None:
        dedup = DedupConfig(**{**dedup.model_dump(), "threshold": threshold})
    report = leakage_check(rows, dedup, label_fields=fields)
    if as_json:
        click.echo(_dump({"threshold": report.threshold, "checked": report.checked,
                          "hits": [h.__dict__ for h in report.hits],
                          "conflicts": [c.as_dict() for c in report.conflicts],
                          "conflicts_across_splits": report.conflicts_across,
                          "conflicts_in_use": report.conflicts_in_use}))
    else:
        click.echo(f"checked {report.checked} protected row(s) at Jaccard >= {report.threshold}: "
                   f"{len(report.hits)} with a train neighbour")
        for hit in report.hits[: limit or None]:
            click.echo(f"  {hit.row_id} [{hit.split}] ~ {hit.neighbour_row_id} ({hit.similarity:.2f}): "
                       f"{hit.input[:60]!r} ~ {hit.neighbour_input[:60]!r}")
        _echo_conflicts(report.conflicts, limit)
    if strict and not report.clean:
        raise IntegrityError(f"{len(report.hits)} protected row(s) leak into train; {report.conflicts_in_use} "
                             "text(s) carry more than one label",
                             hint="rebuild with near_duplicates on, or regroup the sources; relabel or drop the "
                             "conflicting copies")


@cli.command("status")
@click.argument("directory", type=click.Path(file_okay=False))
def status_cmd(directory: str) -> None:
    """Counts of inputs, rows, filter verdicts, splits and review queues."""
    from collections import Counter

    from distillgate.data.review import queue_sizes
    from distillgate.data.store import WorkingCopy

    with WorkingCopy.open(directory) as wc:
        rows = wc.rows()
        click.echo(f"{wc.root}: {wc.count_inputs()} input(s), {len(rows)} row(s)")
        for name in ("filter_status", "split", "review_state"):
            counts = Counter(str(getattr(r, name)) for r in rows)
            click.echo(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        sizes = queue_sizes(wc)
        if sizes:
            click.echo("  review queues: " + ", ".join(f"{k}={v}" for k, v in sorted(sizes.items())))
        head = wc.root / "HEAD"
        if head.exists():
            click.echo(f"  HEAD: {head.read_text().strip()[:16]}")


@cli.command("freeze")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--notes", default="", help="Release notes to add to the generated ones.")
def freeze_cmd(directory: str, notes: str) -> None:
    """Write a content-addressed version of the working copy (and hash-lock the golden set)."""
    from distillgate.data.store import WorkingCopy
    from distillgate.data.versions import freeze

    with WorkingCopy.open(directory) as wc:
        version = freeze(wc, notes=notes)
    click.echo(f"version {version.version_id[:16]} at {version.path}")
    click.echo(version.manifest["release_notes"].rstrip())


@cli.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Working copy holding the versions.")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows to list (0: all).")
@click.option("--json", "as_json", is_flag=True)
def diff_cmd(a: str, b: str, root: str | None, limit: int, as_json: bool) -> None:
    """Row-level changes from version A to version B, and why."""
    from distillgate.data.versions import diff, open_version

    result = diff(open_version(a, root), open_version(b, root))
    if as_json:
        click.echo(_dump({"a": result.a, "b": result.b, "counts": result.counts(),
                          "config_changes": result.config_changes,
                          "changes": [c.__dict__ for c in result.changes]}))
        return
    click.echo(f"{(result.a or '')[:16]} -> {result.b[:16]}: {len(result.changes)} row change(s)")
    for item in result.config_changes:
        click.echo(f"  {item}")
    for cause, n in sorted(result.counts().items(), key=lambda kv: -kv[1]):
        click.echo(f"  {cause}: {n}")
    shown = result.changes if limit == 0 else result.changes[:limit]
    for change in shown:
        detail = "; ".join(f"{f}: {change.before.get(f)!r} -> {change.after.get(f)!r}" for f in change.fields[:4])
        click.echo(f"{change.kind:8} {change.row_id} [{', '.join(change.causes)}] {detail}")


@cli.command("export")
@click.argument("ref")
@click.argument("url")
@click.option("--format", "formats", multiple=True, type=click.Choice(["jsonl", "parquet", "hf"]),
              help="Formats to write (repeatable; default jsonl and parquet).")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Working copy holding the version.")
@db_option
@click.option("--policy", "policy_path", required=True, type=click.Path(exists=True),
              help="Policy file or directory: its allowed_destinations (and sign-off rules) judge the export.")
@click.option("--project", required=True, help="policy_project_id the dataset belongs to.")
@click.option("--run", required=True, help="policy_run_id the dataset belongs to (its sign-offs count).")
@click.option("--user", required=True, help="Who exports (recorded in the decision log).")
def export_cmd(ref: str, url: str, formats: tuple[str, ...], root: str | None, db: str, policy_path: str,
               project: str, run: str, user: str) -> None:
    """Export version REF to URL (file:///dir or s3://bucket/prefix/; endpoint from $DISTILLGATE_S3_ENDPOINT),
    after the policy approves the destination and the run's sign-off (the decision is logged either way)."""
    from distillgate.data.config import parse_config
    from distillgate.data.export import export_version
    from distillgate.data.gate import judge
    from distillgate.data.versions import open_version
    from distillgate.ledger.store import Store
    from distillgate.policy.model import load_policies

    version = open_version(ref, root)
    policies = load_policies(policy_path)
    cfg = parse_config(version.manifest.get("config", {}), "manifest")
    with Store.open(db) as store:
        admission = judge(store, policies, kind="export", artifact="dataset", user=user, project=project, run=run,
                          version_id=version.version_id, destination=url)
        # the dataset config may narrow the policy's destinations further, never widen them
        allowed = cfg.export.allowed_destinations or policies.select(project).destinations()
        written = export_version(version, url, formats=formats or ("jsonl", "parquet"), allowed=allowed,
                                 endpoint_url=os.environ.get("DISTILLGATE_S3_ENDPOINT"))
        store.append_event("export", {"artifact": "dataset", "run": run, "project": project, "user": user,
                                      "destination": url, "version_id": version.version_id, "files": written,
                                      "decision_index": admission.entry.index})
    for item in written:
        click.echo(item)


def _register_generate() -> None:
    from distillgate.cli.generate_cmd import generate

    cli.add_command(generate)


_register_generate()


def _register_grade() -> None:
    from distillgate.cli.grade_cmd import grade

    cli.add_command(grade)


_register_grade()
