"""The run's front page: ``<workdir>/report.html`` (self-contained) and ``<workdir>/metrics.json``.

Headline numbers first (teacher and student accuracy against gold, agreement, retention with its interval,
refusal rates, speed-up, the traffic share the student can take), then the stages, the governance metadata
(policies, dataset version, teacher card, decision-log checkpoint, reviewers) and links to each suite's full report.
The promotion section shows every gate of the ``promote`` stage, pass, fail or skipped, with why and its code.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillgate.pipeline.study import flatten, front_page

if TYPE_CHECKING:
    from distillgate.pipeline.run import Pipeline


def _est(value: Any) -> str:
    if value is None or (isinstance(value, dict) and value.get("estimate", 0) is None):
        return "undefined"
    if isinstance(value, dict) and "estimate" in value:
        est, lo, hi = value.get("estimate"), value.get("low"), value.get("high")
        if isinstance(est, (int, float)) and isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            return f"{est:.3f} <span class=ci>[{lo:.3f}, {hi:.3f}]</span>"
        return html.escape(str(est))
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{html.escape(str(k))}: {_est(v)}" for k, v in value.items())
    return html.escape(str(value))


def headline_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for suite, m in metrics.get("suites", {}).items():
        for key, value in (m.get("headline") or {}).items():
            rows.append((suite, key.replace("_", " "), _est(value)))
    return rows


def collect_metrics(pipeline: Pipeline) -> dict[str, Any]:
    eval_out = pipeline.require("eval")
    suites: dict[str, Any] = {}
    files = eval_out.get("files") or {}
    for key, path in files.items():
        if key.endswith("_metrics"):
            suites[key.removesuffix("_metrics")] = json.loads(Path(path).read_text())
    for key, path in files.items():  # the recipe comparison (``compare``) joins its suite's headline
        name = key.removesuffix("_lift")
        if key.endswith("_lift") and name in suites and Path(path).exists():
            suites[name].setdefault("headline", {})["recipe_lift"] = json.loads(Path(path).read_text())
    train = pipeline.require("train")
    version = pipeline.require("freeze")
    record = json.loads(Path(train["record"]).read_text()) if Path(train["record"]).exists() else {}
    manifest = json.loads((Path(version["version_dir"]) / "manifest.json").read_text())
    p = pipeline.project
    card_path = pipeline.workdir / "teacher_card.json"
    teacher_card = json.loads(card_path.read_text()) if card_path.exists() else None
    return {
        "run": p.run_id, "name": p.name, "project": p.project, "user": p.user,
        "teacher_card": teacher_card,
        "policies": [{"policy_id": pol.policy_id, "policy_hash": pol.content_hash} for pol in pipeline.policies],
        "dataset_version": train.get("version_id") or version["version_id"],
        "dataset_counts": manifest.get("counts"),
        "teacher": manifest.get("teacher"),
        "training": {k: record.get(k) for k in ("recipe", "family", "steps", "tokens", "train_seconds", "final_loss",
                                                "student", "traces")
                     if k in record} or {k: train.get(k) for k in ("rows", "steps", "final_loss")},
        "checkpoint": pipeline.checkpoint(),
        "reviewers": _reviewers(pipeline),
        "signoffs": pipeline.signoffs(train.get("version_id") or version["version_id"]),
        "suites": suites,
        "promotion": _promotion(pipeline),
        **synthetic_section(eval_out, suites, manifest.get("counts") or {}),
        **row_quality(Path(train.get("version_dir") or version["version_dir"])),
    }


def synthetic_section(eval_out: dict[str, Any], suites: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    """``metrics.synthetic``: real vs synthetic train rows (share, train fit) and the real test slice next to the
    edge-case probe (``pipeline.synthetic_eval``); absent when the eval stage measured neither."""
    fit, probe = eval_out.get("train_fit"), eval_out.get("edge_probe")
    if not fit and not probe:
        return {}
    out: dict[str, Any] = {"train_share": (counts.get("synthetic") or {}).get("train_share")}
    if fit:
        out["train_fit"] = fit
    if probe:
        key = probe.get("compared_with")
        real = suites.get(key) or {}
        overall = next((s for s in real.get("retention") or [] if s.get("slice") == "all"), None)
        if overall is not None:
            m = (overall.get("metrics") or {}).get("accuracy") or {}
            out["real_test"] = {"suite": key, "n": overall.get("n"), "teacher_accuracy": m.get("teacher"),
                                "student_accuracy": m.get("student"), "accuracy_retention": m.get("retention"),
                                "agreement": overall.get("agreement")}
        out["edge_probe"] = probe
    return {"synthetic": out}


def _pct_ci(value: Any) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("estimate"), (int, float)):
        return "–"
    text = f"{100 * value['estimate']:.1f} %"
    lo, hi = value.get("low"), value.get("high")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        text += f" <span class=ci>[{100 * lo:.1f}, {100 * hi:.1f}]</span>"
    return text


def synthetic_html(section: dict[str, Any] | None) -> str:
    """The report's "Real vs synthetic" tables (train rows; real test slice and edge-case probe)."""
    if not section:
        return ""
    e = html.escape
    parts = ["<h2>Real vs synthetic</h2>"]
    fit = section.get("train_fit") or {}
    groups = fit.get("groups") or {}
    if groups:
        rows = []
        for name, g in groups.items():
            beside = (g.get("teacher_label_is_gold"), "teacher label = gold") if name == "real" else \
                (g.get("teacher_label_is_intended"), "teacher label = intended")
            rows.append(f"<tr><td>{e(name)}</td><td>{g.get('train_rows')}</td>"
                        f"<td>{100 * float(g.get('share_of_train') or 0):.1f} %</td><td>{g.get('scored')}</td>"
                        f"<td>{_pct_ci(g.get('student_agrees_with_trained_label'))}</td>"
                        f"<td>{_pct_ci(beside[0])} <span class=ci>{e(beside[1])}</span></td></tr>")
        parts.append("<h3>Train rows (train fit: the student's agreement with the label each row was trained on; "
                     "not held-out accuracy)</h3><table><tr><th>rows</th><th>train rows</th><th>share</th>"
                     "<th>scored</th><th>student = trained label</th><th>teacher's label</th></tr>"
                     + "".join(rows) + "</table>")
    probe = section.get("edge_probe") or {}
    slices = probe.get("slices") or {}
    if slices:
        rows = []
        real = section.get("real_test")
        if real:
            rows.append(f"<tr><td>real test ({e(str(real.get('suite')))})</td><td>{real.get('n')}</td>"
                        f"<td>{_pct_ci(real.get('teacher_accuracy'))}</td><td>{_pct_ci(real.get('student_accuracy'))}"
                        f"</td><td>{_est(real.get('accuracy_retention'))}</td><td>{_pct_ci(real.get('agreement'))}"
                        "</td></tr>")
        for name, sl in slices.items():
            label = "edge-case probe (all)" if name == "all" else f"· {name}"
            rows.append(f"<tr><td>{e(label)}</td><td>{sl.get('n')}</td><td>{_pct_ci(sl.get('teacher_accuracy'))}"
                        f"</td><td>{_pct_ci(sl.get('student_accuracy'))}</td>"
                        f"<td>{_est(sl.get('accuracy_retention'))}</td><td>{_pct_ci(sl.get('agreement'))}</td></tr>")
    if probe.get("skipped"):
        parts.append(f"<p>edge-case probe not run: {e(str(probe['skipped']))}</p>")
    if slices:
        dropped = (probe.get("meta") or {}).get("dropped") or {}
        note = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in dropped.items() if v)
        parts.append("<h3>Evaluation: real held-out rows and the edge-case probe (the same rows under deterministic "
                     "edge-case transforms, gold label kept; never a training row)</h3><table><tr><th>slice</th>"
                     "<th>items</th><th>teacher accuracy</th><th>student accuracy</th><th>retention</th>"
                     "<th>agreement</th></tr>" + "".join(rows) + "</table>"
                     + (f"<p class=sub>probe items left out: {e(note)}</p>" if note else ""))
    return "".join(parts)


def row_quality(version_dir: Path) -> dict[str, Any]:
    """The dataset's reasoning traces (``data.trace_stats``) and rubric grades, when its rows carry any."""
    from distillgate.data.trace_stats import trace_stats
    from distillgate.data.versions import load_version

    rows = load_version(str(version_dir))
    out: dict[str, Any] = {}
    traces = trace_stats(rows)
    if traces["with_trace"]:
        out["traces"] = traces
    grades = [float(r["grade"]) for r in rows if isinstance(r.get("grade"), (int, float))]
    graded = [r for r in rows if r.get("grading")]
    if graded:
        failed = sum(1 for r in rows if "LOW_GRADE" in (r.get("filter_reasons") or []))
        out["grades"] = {"graded": len(grades), "unparsed": len(graded) - len(grades),
                         "mean": sum(grades) / len(grades) if grades else None,
                         "min": min(grades) if grades else None, "low_grade_filtered": failed,
                         "rubric": (graded[0].get("grading") or {}).get("rubric_id")}
    return out


def _promotion(pipeline: Pipeline) -> dict[str, Any] | None:
    """The promote stage's verdict (deployable, reason codes, every gate), or None before it has run."""
    path = pipeline.cache.path("promote")
    if not path.exists():
        return None
    outputs = json.loads(path.read_text()).get("outputs") or {}
    return {k: outputs.get(k) for k in ("deployable", "reasons", "gates", "required")}


def promotion_html(promotion: dict[str, Any] | None) -> str:
    e = html.escape
    if promotion is None:
        return "<p>the promote stage has not run</p>"
    verdict = ("<p><b>promoted</b>: every declared gate holds; the signed record is <code>train/promotion.json"
               "</code></p>" if promotion.get("deployable") else
               f"<p><b>not promoted</b> ({e(', '.join(promotion.get('reasons') or []))}); the denial is in the "
               "decision log" + (" and fails the run (promote.required)" if promotion.get("required") else
                                 ", a finding of this run (promote.required is false)") + "</p>")
    rows = "".join(f"<tr><td>{e(str(g.get('gate')))}</td><td>{e(str(g.get('status')))}</td>"
                   f"<td>{e(str(g.get('threshold')))}</td><td>{e(str(g.get('why')))}</td>"
                   f"<td>{e(str(g.get('code') or ''))}</td></tr>" for g in promotion.get("gates") or [])
    return (f"{verdict}<table><tr><th>gate</th><th>status</th><th>threshold</th><th>why</th><th>code</th></tr>"
            f"{rows}</table>")


def _reviewers(pipeline: Pipeline) -> list[str]:
    from distillgate.ledger.store import Store

    with Store.open(pipeline.store_path) as store:
        return sorted({str(e.body.get("reviewer")) for e in store.entries(run=pipeline.project.run_id, kind="review",
                                                                     project=pipeline.project.project)
                       if e.body.get("reviewer")})


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1050px;color:#1d2433;
padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d8dde6}
.sub{color:#5b6577}table{border-collapse:collapse;width:100%;margin:.6rem 0}
td,th{border-bottom:1px solid #e6e9ef;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f6fa;font-weight:600}.ci{color:#5b6577;font-size:.85em}code{font-size:.85em;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{border:1px solid #d8dde6;border-radius:8px;padding:.7rem 1rem;
min-width:200px;flex:1}.card b{display:block;font-size:1.35rem}.card span{color:#5b6577;font-size:.85rem}
a{color:#1f5fbf}.front p{font-size:1.05rem;margin:.4rem 0}h3{font-size:1rem;margin-top:1.2rem}
"""


def render(metrics: dict[str, Any], stages: list[dict[str, Any]], links: dict[str, str]) -> str:
    e = html.escape
    cards = []
    for suite, m in metrics.get("suites", {}).items():
        h = m.get("headline") or {}
        for key in ("teacher_accuracy", "student_accuracy", "accuracy_retention", "agreement",
                    "student_traffic_share", "speedup_mean_latency"):
            if key in h:
                cards.append(f"<div class=card><span>{e(suite)} · {e(key.replace('_', ' '))}</span>"
                             f"<b>{_est(h[key])}</b></div>")
        for key in ("over_refusal", "under_refusal"):
            if key in h:
                cards.append(f"<div class=card><span>{e(suite)} · {e(key.replace('_', ' '))} "
                             f"(teacher / student)</span><b>{_est(h[key].get('teacher'))} / "
                             f"{_est(h[key].get('student'))}</b></div>")
    stage_rows = "".join(f"<tr><td>{e(s['name'])}</td><td>{e(s['status'])}</td><td>{e(s['summary'])}</td></tr>"
                         for s in stages)
    head_rows = "".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td><td>{c}</td></tr>" for a, b, c in headline_rows(metrics))
    link_items = "".join(f"<li><a href='{e(href)}'>{e(name)}</a></li>" for name, href in links.items())
    cp = metrics.get("checkpoint") or {}
    meta = [
        ("project / user / run", f"{metrics.get('project')} / {metrics.get('user')} / {metrics.get('run')}"),
        ("policies", ", ".join(f"{p['policy_id']}@{p['policy_hash'][:16]}" for p in metrics.get("policies", []))),
        ("dataset version", str(metrics.get("dataset_version"))),
        ("decision-log checkpoint", f"tree size {cp.get('tree_size')}, root {cp.get('root_hash')}, key {cp.get('key_id')}"),
        ("reviewers", ", ".join(metrics.get("reviewers") or []) or "none recorded"),
        ("signed off by", "; ".join(f"{s['reviewer']} at {s['signed_at']} (version {s['version_id'][:16]}, "
                                    f"verdicts {json.dumps(s['reviewed'].get('verdicts'), sort_keys=True)}, "
                                    f"log entry {s['index']})" for s in metrics.get("signoffs") or [])
         or "no sign-off"),
    ]
    meta_rows = "".join(f"<tr><th>{e(k)}</th><td><code>{e(v)}</code></td></tr>" for k, v in meta)
    tables = ""
    for title, key in (("Dataset counts", "dataset_counts"), ("Teacher card", "teacher_card"),
                       ("Teacher (as recorded with the rows)", "teacher"),
                       ("Reasoning traces (answer_differs: share of inputs whose answer after a trace differs "
                        "from the answer without one)", "traces"),
                       ("Rubric grades", "grades"), ("Training", "training")):
        pairs = flatten(metrics.get(key))
        if pairs and any(v for _, v in pairs):
            body = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in pairs)
            tables += f"<h3>{e(title)}</h3><table>{body}</table>"
    front = "".join(f"<p>{e(line)}</p>" for line in front_page(metrics))
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width,initial-scale=1"><title>distillgate run {e(str(metrics.get('name')))}</title>
<style>{_CSS}</style></head><body>
<h1>distillgate run: {e(str(metrics.get('name')))}</h1>
<p class=sub>A governed distillation study: every teacher call went through the policy gateway and is in the
decision log. Intervals are 95% paired bootstrap intervals over items.</p>
<div class=front>{front}</div>
<h2>Headline</h2><div class=cards>{''.join(cards) or '<p>no evaluation yet</p>'}</div>
<h2>Promotion gates</h2>{promotion_html(metrics.get("promotion"))}
{synthetic_html(metrics.get("synthetic"))}
<h2>All headline numbers</h2><table><tr><th>suite</th><th>measure</th><th>value</th></tr>{head_rows}</table>
<h2>Full reports</h2><ul>{link_items}</ul>
<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>result</th></tr>{stage_rows}</table>
<h2>Governance</h2><table>{meta_rows}</table>{tables}
</body></html>
"""


def write_run_report(pipeline: Pipeline) -> tuple[Path, Path]:
    metrics = collect_metrics(pipeline)
    stages = []
    for name in ("generate", "synthesize", "build", "freeze", "train", "eval", "promote"):
        path = pipeline.cache.path(name)
        if path.exists():
            data = json.loads(path.read_text())
            outputs = data.get("outputs") or {}
            stages.append({"name": name, "status": "done", "summary": _stage_summary(name, outputs)})
    links = {}
    for key, path in (pipeline.require("eval").get("files") or {}).items():
        if key.endswith("_report"):
            links[f"{key.removesuffix('_report')} report"] = str(Path(path).relative_to(pipeline.workdir))
    out_html = pipeline.workdir / "report.html"
    out_metrics = pipeline.workdir / "metrics.json"
    out_html.write_text(render(metrics, stages, links), encoding="utf-8")
    out_metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return out_html, out_metrics


def _stage_summary(name: str, outputs: dict[str, Any]) -> str:
    if name == "generate":
        r = outputs.get("report") or {}
        return f"{outputs.get('rows')} rows; {r.get('tokens')} tokens"
    if name == "synthesize":
        r = outputs.get("report") or {}
        return (f"{outputs.get('synthetic_inputs', 0)} synthetic inputs (added now: {r.get('added') or 'none'})"
                if r else "not enabled")
    if name == "build":
        train = ((outputs.get("synthetic") or {}).get("by_split") or {}).get("train") or {}
        mix = f"; train {train.get('real')} real + {train.get('synthetic')} synthetic" if train.get("synthetic") else ""
        return f"{outputs.get('passed')}/{outputs.get('rows')} pass; splits {outputs.get('splits')}{mix}"
    if name == "freeze":
        return f"version {str(outputs.get('version_id'))[:16]}"
    if name == "train":
        return f"{outputs.get('rows')} rows, {outputs.get('steps')} steps, final loss {outputs.get('final_loss')}"
    if name == "promote":
        return "deployable" if outputs.get("deployable") else f"not promoted: {', '.join(outputs.get('reasons') or [])}"
    return ", ".join(sorted((outputs.get("headline") or {}).keys()))
