"""The evaluation report: one self-contained HTML file (figures embedded as base64 PNG) and ``metrics.json``.

Order on the page: headline numbers, retention by slice, lost/gained items, refusal transfer (2x2), routing
(coverage–accuracy curve), speed and cost, run metadata. No scripts, no external resources: the file opens
offline and renders the same in any browser.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from distillgate.evals.evaluate import EvalResult
from distillgate.evals.retention import SliceResult
from distillgate.evals.stats import Interval

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEACHER_COLOUR = "#3b6ea5"
STUDENT_COLOUR = "#d9822b"


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def retention_figure(slices: list[SliceResult], metric: str = "accuracy") -> str | None:
    """Teacher and student score per non-label slice, with paired CIs."""
    rows = [s for s in slices if s.slice != "label" and s.get(metric) is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.0))
    names = [("all items" if s.slice == "all" else f"{s.slice}: {s.value}") + f" (n={s.n})" for s in rows]
    for offset, role, colour in ((-0.17, "teacher", TEACHER_COLOUR), (0.17, "student", STUDENT_COLOUR)):
        for i, s in enumerate(rows):
            comp = s.get(metric)
            assert comp is not None
            iv: Interval = getattr(comp, role)
            y = len(rows) - 1 - i + offset
            if not math.isnan(iv.low):
                ax.plot([iv.low, iv.high], [y, y], color=colour, lw=2, alpha=0.6)
            ax.plot([iv.estimate], [y], "o", color=colour, label=role if i == 0 else None)
    ax.set_yticks(range(len(rows)), list(reversed(names)))
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"{metric.replace('_', ' ')} (95% paired bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", frameon=False)
    return _png(fig)


def routing_figure(result: EvalResult) -> str | None:
    routing = result.routing
    if routing is None or len(routing.curve) < 2:
        return None
    plt = _plt()
    pts = routing.curve
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    cov = [p.coverage for p in pts]
    ax.plot(cov, [p.system_accuracy for p in pts], color="#444", label="system accuracy (student + teacher)")
    routed = [(p.coverage, p.student_accuracy) for p in pts if p.routed > 0]
    ax.plot([c for c, _ in routed], [a for _, a in routed], color=STUDENT_COLOUR,
            label="student accuracy on routed items")
    teacher_routed = [(p.coverage, p.teacher_accuracy) for p in pts if p.routed > 0]
    ax.plot([c for c, _ in teacher_routed], [a for _, a in teacher_routed], color=TEACHER_COLOUR, ls="--",
            label="teacher accuracy on the same items")
    chosen = routing.chosen
    ax.axvline(chosen.coverage, color="#2a9d4b", ls=":", label=f"chosen: {chosen.coverage:.0%} to student")
    ax.set_xlabel("coverage (share of traffic routed to the student)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="best")
    return _png(fig)


def latency_figure(result: EvalResult) -> str | None:
    if not result.speed:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 2.2))
    labels = [f"{s.role}\n{s.model}" for s in result.speed]
    means = [s.latency_mean_s for s in result.speed]
    p95 = [s.latency_p95_s for s in result.speed]
    colours = [TEACHER_COLOUR if s.role == "teacher" else STUDENT_COLOUR for s in result.speed]
    ax.barh(range(len(labels)), means, color=colours, alpha=0.85, label="mean")
    ax.plot(p95, range(len(labels)), "k|", markersize=18, label="p95")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per item")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def refusal_figure(result: EvalResult) -> str | None:
    if result.transfer is None:
        return None
    plt = _plt()
    rates = result.transfer.rates[:3]
    fig, ax = plt.subplots(figsize=(6.5, 2.4))
    for offset, role, colour in ((-0.17, "teacher", TEACHER_COLOUR), (0.17, "student", STUDENT_COLOUR)):
        for i, rate in enumerate(rates):
            iv: Interval = getattr(rate, role)
            y = len(rates) - 1 - i + offset
            if not math.isnan(iv.low):
                ax.plot([iv.low, iv.high], [y, y], color=colour, lw=2, alpha=0.6)
            ax.plot([iv.estimate], [y], "o", color=colour, label=role if i == 0 else None)
    ax.set_yticks(range(len(rates)), list(reversed([r.name for r in rates])), fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("rate (95% paired bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return _png(fig)


def _fmt(value: Any, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.1%}" if pct else f"{value:.3f}"
    return str(value)


def _ci(iv: Interval, pct: bool = True) -> str:
    if math.isnan(iv.estimate):
        return "–"
    if math.isnan(iv.low):
        return _fmt(iv.estimate, pct)
    return f"{_fmt(iv.estimate, pct)} <span class=ci>[{_fmt(iv.low, pct)}, {_fmt(iv.high, pct)}]</span>"


def render_html(result: EvalResult) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.tests["finite_number"] = lambda v: isinstance(v, int | float) and math.isfinite(v)
    env.filters["pct"] = _fmt
    env.filters["ci"] = lambda iv, pct=True: markupsafe.Markup(_ci(iv, pct))
    env.filters["num"] = lambda v: "–" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.3g}")
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    label_rows = sorted((s for s in result.slices if s.slice == "label"),
                        key=lambda s: (_diff(s), s.value))
    template = env.get_template("report.html.j2")
    return template.render(
        r=result,
        headline=result.headline(),
        overall=result.slices[0] if result.slices else None,
        other_slices=[s for s in result.slices[1:] if s.slice != "label"],
        label_rows=label_rows,
        fig_retention=retention_figure(result.slices),
        fig_routing=routing_figure(result),
        fig_latency=latency_figure(result),
        fig_refusal=refusal_figure(result),
    )


def _diff(s: SliceResult) -> float:
    comp = s.get("accuracy")
    if comp is None or math.isnan(comp.difference.estimate):
        return 0.0
    return comp.difference.estimate


def write_report(result: EvalResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``metrics.json`` into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html = out_dir / "report.html"
    metrics = out_dir / "metrics.json"
    html.write_text(render_html(result), encoding="utf-8")
    metrics.write_text(json.dumps(sanitize(result.as_dict()), indent=2, sort_keys=True, default=_json_default,
                                  allow_nan=False) + "\n", encoding="utf-8")
    return html, metrics


def _json_default(value: Any) -> Any:
    return str(value)


def sanitize(value: Any) -> Any:
    """Replace NaN/inf floats by None so that metrics.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return value
