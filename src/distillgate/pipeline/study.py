"""What the run report's front page says in words: what was distilled into what, how much survived, and why a
figure is undefined or a routing threshold is trivial -- and the governance metadata as tables, not JSON."""

from __future__ import annotations

import math
from typing import Any


def _num(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("estimate")
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def _pct(value: Any) -> str:
    v = _num(value)
    return "undefined" if v is None else f"{100 * v:.1f} %"


def _ci(value: Any) -> str:
    if isinstance(value, dict) and _num(value.get("low")) is not None and _num(value.get("high")) is not None:
        return f" (95 % CI {100 * float(value['low']):.1f}–{100 * float(value['high']):.1f} %)"
    return ""


def _teacher_words(metrics: dict[str, Any]) -> str:
    card = metrics.get("teacher_card") or {}
    method = card.get("method") or {}
    model = card.get("model_id") or (metrics.get("teacher") or {}).get("model") or "the teacher"
    if method.get("kind") == "retrieval-augmented label scoring":
        pool = method.get("pool") or {}
        return (f"{model} shown its {method.get('k')} nearest examples from a labelled pool of "
                f"{pool.get('rows', '?'):,} ({pool.get('source')})")
    return str(model)


def _student_words(metrics: dict[str, Any]) -> str:
    student = (metrics.get("training") or {}).get("student") or {}
    params = student.get("parameters")
    size = f"{params / 1e6:.1f}M-parameter " if isinstance(params, (int, float)) else ""
    if student.get("family") == "encoder_classifier":
        return f"a {size}encoder classifier ({student.get('encoder')} + a linear head, fine-tuned end to end)"
    layers = student.get("layers")
    return f"a {size}causal LM" + (f" of {layers} layers" if layers else "")


def front_page(metrics: dict[str, Any]) -> list[str]:
    """Sentences for the top of the report: the one-line result first, then explanations where needed."""
    out: list[str] = []
    for suite, m in (metrics.get("suites") or {}).items():
        h = m.get("headline") or {}
        if "teacher_accuracy" not in h and "agreement" not in h:
            continue
        items = m.get("items")
        t, s, r = h.get("teacher_accuracy"), h.get("student_accuracy"), h.get("accuracy_retention")
        speed = _num(h.get("speedup_mean_latency"))
        sentence = (f"{_teacher_words(metrics)} was distilled into {_student_words(metrics)}: on {items} "
                    f"{suite} items the teacher is {_pct(t)} accurate and the student {_pct(s)}, so the student "
                    f"keeps {_pct(r)}{_ci(r)} of the teacher's accuracy")
        if speed is not None:  # one decimal below 20x: 9.8x must not read as 10x
            sentence += f", at {speed:.1f}x the speed per item." if speed < 20 else \
                f", at {speed:.0f}x the speed per item."
        else:
            sentence += "."
        out.append(sentence)
        reuse = (m.get("teacher") or {}).get("reuse")
        if isinstance(reuse, dict) and reuse.get("reused"):
            live, same = int(reuse.get("asked_live") or 0), int(reuse.get("live_matches") or 0)
            check = (f"{live} were asked again live through the gateway (the teacher's latency comes from these) "
                     f"and {same} of {live} gave the stored answer" if live else
                     "none was asked again live, so the teacher's latency is not measured here")
            out.append(f"The teacher's answers on {reuse['reused']} of the {items} {suite} items come from the "
                       f"labelling run (the same governed request, stamped); {check}.")
            if live and same < live:
                out.append(f"Warning: {live - same} live answer(s) differ from the stored ones: the teacher or its "
                           "settings changed since the rows were labelled; rerun `generate` before trusting "
                           "the teacher's accuracy.")
        if _num(r) is None:
            why = ("the items have no gold labels" if _num(t) is None and _num(s) is None else
                   "the teacher got no item right (retention divides by its accuracy)" if _num(t) == 0 else
                   "the estimate is not finite")
            out.append(f"Retention is undefined on {suite}: {why}. Agreement with the teacher is "
                       f"{_pct(h.get('agreement'))}{_ci(h.get('agreement'))}.")
        share = _num(h.get("student_traffic_share"))
        if share is not None:
            if share <= 0:
                out.append(f"Routing sends no traffic to the student on {suite}: no confidence threshold keeps "
                           "the student's accuracy on what it answers at the target share of the teacher's.")
            elif share >= 1:
                target = _num((m.get("routing") or {}).get("target"))
                if _num(r) is not None and target is not None and (_num(r) or 0) >= target:
                    out.append(f"Routing sends all traffic to the student on {suite}: it keeps {_pct(r)} of the "
                               f"teacher's accuracy over all items, above the {_pct(target)} target, so no item "
                               "has to go to the teacher; a stricter eval.routing_target keeps the least confident "
                               "items with the teacher.")
                else:
                    out.append(f"Routing sends all traffic to the student on {suite}: it meets the target on every "
                               "item, or the teacher is no better than the student here -- check the teacher's "
                               "accuracy before trusting this.")
            else:
                out.append(f"Routing sends {_pct(share)} of {suite} traffic to the student (confidence ≥ "
                           f"{_num(h.get('routing_threshold')) or 0:.3f}); the rest goes to the teacher.")
        lift = (h.get("recipe_lift") or {}).get("accuracy")
        if lift:
            names = [k for k in lift if k != "lift"]
            d = lift["lift"]
            lo, hi = _num(d.get("low")), _num(d.get("high"))
            ci = f" (95 % CI {100 * lo:+.1f} to {100 * hi:+.1f})" if lo is not None and hi is not None else ""
            out.append(f"Recipe: {names[0]} vs {names[1]} on the same rows: {_pct(lift[names[0]])} against "
                       f"{_pct(lift[names[1]])}, a lift of {100 * (_num(d) or 0):+.1f} points{ci}.")
    return out


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts/lists as (dotted key, text) rows for a two-column table."""
    rows: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            rows += flatten(v, f"{prefix}[{i}]")
    elif isinstance(value, list):
        rows.append((prefix, ", ".join(str(v) for v in value)))
    else:
        rows.append((prefix, "" if value is None else str(value)))
    return rows
