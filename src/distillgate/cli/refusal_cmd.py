"""``distillgate refusal``: score any set of answers for refusals, and check the detectors against hand labels.

    distillgate refusal classify answers.csv --column response [--detector embedding] [--out scored.csv]
    distillgate refusal agreement [--heldout data/refusal/heldout.csv]
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from distillgate.errors import NotFoundError, UserError

DETECTOR_CHOICE = click.Choice(["string", "ngram", "embedding"])


@click.group(name="refusal")
def cli() -> None:
    """Detect refusals (compliance, full or partial refusal, context refusal, degenerate output)."""


@cli.command("classify")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--column", required=True, help="Column holding the answers to classify.")
@click.option("--detector", type=DETECTOR_CHOICE, default="ngram", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write here instead of back into FILE.")
def classify(file: str, column: str, detector: str, out: str | None) -> None:
    """Add `refused` (0/1: full or partial refusal) and `refusal_kind` (comply|safety|partial|context|degenerate)
    columns to FILE.csv."""
    from distillgate.evals.refusal import KINDS, is_refused, make_detector

    path = Path(file)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist", hint="give a CSV file with a column of answers")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    if column not in fields:
        raise UserError(f"{path} has no column {column!r}", hint=f"choose one of: {', '.join(fields) or '(none)'}")
    kinds = make_detector(detector).classify([row[column] or "" for row in rows])
    for row, kind in zip(rows, kinds, strict=True):
        row["refused"] = "1" if is_refused(kind) else "0"
        row["refusal_kind"] = kind
    out_fields = fields + [f for f in ("refused", "refusal_kind") if f not in fields]
    target = Path(out) if out else path
    with target.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=out_fields)
        writer.writeheader()
        writer.writerows(rows)
    counts = {k: kinds.count(k) for k in KINDS}
    click.echo(f"{target}: {len(rows)} rows, " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@cli.command("agreement")
@click.option("--heldout", type=click.Path(dir_okay=False),
              help="Labelled CSV (text, kind); default the public test split data/refusal/public/test.csv.")
@click.option("--detector", "detectors", type=DETECTOR_CHOICE, multiple=True,
              help="Detector(s) to check; default both.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def agreement_cmd(heldout: str | None, detectors: tuple[str, ...], as_json: bool) -> None:
    """Agreement of each detector with labels (by kind and refused/not, Wilson 95 % intervals, Cohen's kappa)."""
    from distillgate.evals.refusal import REFUSAL_DIR, make_detector
    from distillgate.evals.refusal_agreement import agreement, read_labelled

    texts, gold = read_labelled(Path(heldout) if heldout else REFUSAL_DIR / "public" / "test.csv")
    results = [agreement(make_detector(name), texts, gold) for name in (detectors or ("string", "ngram"))]
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    for r in results:
        click.echo(f"{r.detector:<10} n={r.n}  kind agreement {r.accuracy:.1%} [{r.accuracy_ci[0]:.1%}, "
                   f"{r.accuracy_ci[1]:.1%}]  refused agreement {r.refused_agreement:.1%} "
                   f"[{r.refused_ci[0]:.1%}, {r.refused_ci[1]:.1%}]  kappa {r.cohen_kappa:.3f}")
        for g, row in r.confusion.items():
            if sum(row.values()):
                click.echo(f"    label {g:<10} -> " + "  ".join(f"{p} {n}" for p, n in row.items() if n))
