"""``distillgate route``: choose a student-or-teacher threshold, and apply a saved one.

    distillgate route choose runs/r1/eval/metrics.json --target 0.9 --out threshold.json
    distillgate route apply threshold.json --confidence 0.83          # prints student or teacher
    distillgate route apply threshold.json --file requests.csv --column confidence [--out routed.csv]
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import click

from distillgate.errors import NotFoundError, UserError


@click.group(name="route")
def cli() -> None:
    """Route to the student when it is confident enough, else to the teacher."""


@cli.command("choose")
@click.argument("metrics", type=click.Path(dir_okay=False))
@click.option("--target", type=float, default=0.95, show_default=True,
              help="Student accuracy on routed items >= target x teacher accuracy on them.")
@click.option("--min-routed", type=int, default=10, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Threshold JSON to write.")
def choose(metrics: str, target: float, min_routed: int, out: str) -> None:
    """Pick a threshold from the coverage–accuracy curve stored in an evaluation's metrics.json."""
    from distillgate.evals.routing import CurvePoint, RouteThreshold, choose_threshold, save_threshold

    path = Path(metrics)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist", hint="run `distillgate eval ... --out DIR` first")
    data = json.loads(path.read_text(encoding="utf-8"))
    routing = data.get("routing")
    if not routing:
        raise UserError(f"{path} has no routing curve",
                        hint="routing needs a classification suite and a student with confidences")

    def num(v: float | None, default: float = math.nan) -> float:
        return default if v is None else float(v)

    points = [CurvePoint(num(p["threshold"], math.inf), p["coverage"], p["routed"], num(p["student_accuracy"]),
                         num(p["teacher_accuracy"]), num(p["system_accuracy"])) for p in routing["curve"]]
    chosen = choose_threshold(points, target=target, min_items=min_routed)

    def fin(v: float) -> float | None:
        return v if math.isfinite(v) else None

    threshold = RouteThreshold(
        threshold=chosen.threshold, confidence=routing["confidence_kind"], student=data["student"].get("model", ""),
        teacher=data["teacher"].get("model", ""), suite=data["suite"], target=target, min_items=min_routed,
        coverage=chosen.coverage, student_accuracy=fin(chosen.student_accuracy),
        teacher_accuracy=fin(chosen.teacher_accuracy), system_accuracy=fin(chosen.system_accuracy),
        items=data["items"])
    save_threshold(threshold, Path(out))
    click.echo(f"{out}: threshold {chosen.threshold:.4g}, {chosen.coverage:.1%} of traffic to the student")


@cli.command("apply")
@click.argument("threshold_file", type=click.Path(dir_okay=False))
@click.option("--confidence", type=float, help="One confidence: prints student or teacher.")
@click.option("--file", "file", type=click.Path(dir_okay=False), help="CSV with a confidence column.")
@click.option("--column", default="confidence", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the routed CSV here (default: FILE).")
def apply(threshold_file: str, confidence: float | None, file: str | None, column: str, out: str | None) -> None:
    """Apply a saved threshold to one confidence or to a CSV (adds a `route` column)."""
    from distillgate.evals.routing import load_threshold

    thr = load_threshold(Path(threshold_file))
    if (confidence is None) == (file is None):
        raise UserError("give exactly one of --confidence X or --file FILE.csv",
                        hint="e.g. distillgate route apply threshold.json --confidence 0.8")
    if confidence is not None:
        click.echo(thr.decide(confidence))
        return
    assert file is not None
    path = Path(file)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist", hint="give a CSV with a confidence column")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    if column not in fields:
        raise UserError(f"{path} has no column {column!r}", hint=f"choose one of: {', '.join(fields)}")
    for row in rows:
        raw = (row[column] or "").strip()
        row["route"] = thr.decide(float(raw) if raw else None)
    target = Path(out) if out else path
    with target.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields + ([] if "route" in fields else ["route"]))
        writer.writeheader()
        writer.writerows(rows)
    students = sum(r["route"] == "student" for r in rows)
    click.echo(f"{target}: {students}/{len(rows)} to the student")
