"""What a dataset's reasoning traces look like, and whether thinking changed the teacher's answers.

``trace_stats(rows)`` over row records (``Row.to_record()`` or a frozen version's rows):

* ``rows``, ``with_trace``, ``incomplete`` (a ``<think>`` block never closed: all trace, no answer);
* ``chars`` and ``words`` of the traces: mean, median, p90, max;
* ``answer_differs``: over the inputs whose k samples hold both answers given after a trace and answers given
  without one (a teacher that thinks aloud only sometimes, or samples generated with and without reasoning), the
  share whose majority label (or normalised answer) after a trace differs from the one without; ``compared`` says
  over how many inputs, and it is ``null`` when no input has both kinds of sample — the dataset cannot say then.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


def _summary(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": float(statistics.median(ordered)),
            "p90": float(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]), "max": float(ordered[-1])}


def _answer(row: Mapping[str, Any]) -> str | None:
    for key in ("label", "teacher_label", "output", "output_raw"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip().lower()
    return None


def _majority(answers: list[str | None]) -> str | None:
    counts = Counter(answers)
    return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0]


def trace_stats(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    n = with_trace = incomplete = 0
    chars: list[int] = []
    words: list[int] = []
    by_input: dict[str, dict[bool, list[str | None]]] = {}
    for row in rows:
        if row.get("output_raw") is None:
            continue
        n += 1
        trace = row.get("trace")
        traced = isinstance(trace, str) and bool(trace.strip())
        if traced:
            assert isinstance(trace, str)
            with_trace += 1
            chars.append(len(trace))
            words.append(len(trace.split()))
            reasoning = (row.get("sampling") or {}).get("reasoning") or {}
            if reasoning.get("complete") is False:
                incomplete += 1
        by_input.setdefault(str(row.get("input_id")), {True: [], False: []})[traced].append(_answer(row))
    pairs = [(_majority(s[True]), _majority(s[False])) for s in by_input.values() if s[True] and s[False]]
    differs = sum(a != b for a, b in pairs)
    return {"rows": n, "with_trace": with_trace, "share_with_trace": with_trace / n if n else None,
            "incomplete": incomplete, "chars": _summary(chars), "words": _summary(words),
            "answer_differs": differs / len(pairs) if pairs else None, "compared": len(pairs)}
