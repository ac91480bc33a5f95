"""Speed and cost per model: latency per item and generation throughput, measured on this machine.

Degenerate answers (``evals.degenerate``: empty, junk, token loops) are left out of every figure and counted in
``degenerate``: junk is fast because it is junk, and must not show as a speed-up. Answers without a latency (NaN:
teacher answers reused from the labelling run, ``evals.reuse``) are left out too and counted in ``untimed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from distillgate.evals.answers import Answer


@dataclass(frozen=True)
class Speed:
    model: str
    role: str
    items: int
    latency_mean_s: float
    latency_p50_s: float
    latency_p95_s: float
    completion_tokens: int
    tokens_per_s: float | None  # completion tokens / generation seconds; None when nothing was generated
    parameter_count: int | None
    degenerate: int = 0  # answers left out of the figures above
    untimed: int = 0  # answers with no latency (reused), left out of the figures above

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def speed(answers: Sequence[Answer], *, parameter_count: int | None) -> Speed:
    first = answers[0] if answers else None
    junk = sum(a.degenerate is not None for a in answers)
    answers = [a for a in answers if a.degenerate is None]
    untimed = sum(not math.isfinite(a.latency_s) for a in answers)
    answers = [a for a in answers if math.isfinite(a.latency_s)]
    lat = np.array([a.latency_s for a in answers], dtype=np.float64)
    tokens = int(sum(a.completion_tokens for a in answers))
    gen_seconds = float(sum(a.latency_s for a in answers if a.completion_tokens > 0))
    return Speed(
        model=first.model if first else "",
        role=first.role if first else "",
        items=len(answers),
        latency_mean_s=float(lat.mean()) if len(lat) else float("nan"),
        latency_p50_s=float(np.quantile(lat, 0.5)) if len(lat) else float("nan"),
        latency_p95_s=float(np.quantile(lat, 0.95)) if len(lat) else float("nan"),
        completion_tokens=tokens,
        tokens_per_s=tokens / gen_seconds if tokens and gen_seconds > 0 else None,
        parameter_count=parameter_count,
        degenerate=junk,
        untimed=untimed,
    )
