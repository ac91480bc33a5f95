"""Item-paired statistics: per-item scores, metrics, and the paired bootstrap.

Teacher and student answer the *same* items, so every confidence interval here resamples *items* (with
replacement) and evaluates both models on the same resample. That keeps the pairing: an item the student loses
and the teacher wins moves the two scores together, which is what makes a retention CI narrow when the models
agree and wide when they do not.

    interval = paired_bootstrap(n_items, lambda idx: accuracy(student[idx], gold[idx]))

``Interval.estimate`` is always the value on the full item set; ``low``/``high`` are percentile bounds of the
bootstrap distribution. Resamples on which a statistic is undefined (a retention whose teacher score is 0) are
dropped and counted in ``dropped``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from distillgate.errors import UserError

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval over items."""

    estimate: float
    low: float
    high: float
    n: int
    resamples: int
    dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def encode(values: Sequence[str | None], vocabulary: dict[str, int]) -> IntArray:
    """Map labels to integer codes, growing ``vocabulary``; ``None`` (no parseable answer) becomes -1."""
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if value is None:
            out[i] = -1
        else:
            out[i] = vocabulary.setdefault(value, len(vocabulary))
    return out


def accuracy(pred: IntArray, gold: IntArray) -> float:
    """Share of items whose prediction equals the gold label (an unparsed answer, -1, is wrong)."""
    if len(gold) == 0:
        return math.nan
    return float(np.mean((pred == gold) & (gold >= 0)))


def agreement(a: IntArray, b: IntArray) -> float:
    """Share of items on which two models give the same parsed answer (two unparsed answers do not agree)."""
    if len(a) == 0:
        return math.nan
    return float(np.mean((a == b) & (a >= 0)))


def mean(values: FloatArray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def macro_f1(pred: IntArray, gold: IntArray) -> float:
    """Macro-averaged F1 over the labels present in gold or prediction (as scikit-learn, zero_division=0).

    An unparsed prediction (-1) counts as a wrong answer: a false negative for the gold label, and it does not
    add a label of its own.
    """
    if len(gold) == 0:
        return math.nan
    size = int(max(gold.max(initial=-1), pred.max(initial=-1))) + 1
    if size == 0:
        return math.nan
    hit = pred == gold
    tp = np.bincount(gold[hit & (gold >= 0)], minlength=size).astype(np.float64)
    gold_count = np.bincount(gold[gold >= 0], minlength=size).astype(np.float64)
    pred_count = np.bincount(pred[pred >= 0], minlength=size).astype(np.float64)
    present = (gold_count + pred_count) > 0
    denom = gold_count + pred_count
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    return float(np.mean(f1[present]))


def is_valid_json(raw: str) -> bool:
    """True when the answer (after stripping a Markdown code fence) parses as a JSON object or array."""
    text = raw.strip()
    if text.startswith("```"):
        text = text.strip("`")
        if text.lower().startswith("json"):
            text = text[4:]
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict | list)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN when the denominator is 0 (retention of a teacher that scores 0)."""
    if denominator == 0 or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator


def resample_indices(n: int, resamples: int, seed: int) -> IntArray:
    """The (resamples, n) matrix of item indices every paired statistic of one evaluation shares."""
    if n <= 0:
        return np.zeros((resamples, 0), dtype=np.int64)
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n), dtype=np.int64)


def paired_bootstrap(
    n: int,
    statistic: Callable[[IntArray], float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    indices: IntArray | None = None,
) -> Interval:
    """Percentile bootstrap of ``statistic(idx)`` over item resamples.

    ``statistic`` receives an index array into the paired item arrays and computes whatever it needs for *both*
    models from the same indices. Pass ``indices`` (from ``resample_indices``) to share resamples between
    statistics; otherwise they are drawn from ``seed``.
    """
    if not 0 < level < 1:
        raise UserError(f"confidence level must be between 0 and 1, got {level}", hint="use e.g. 0.95")
    if resamples < 1:
        raise UserError(f"resamples must be at least 1, got {resamples}", hint="use e.g. 2000")
    estimate = statistic(np.arange(n, dtype=np.int64))
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0, 0)
    idx = indices if indices is not None else resample_indices(n, resamples, seed)
    values = np.array([statistic(row) for row in idx], dtype=np.float64)
    finite = values[~np.isnan(values)]
    dropped = int(len(values) - len(finite))
    if len(finite) == 0:
        return Interval(estimate, math.nan, math.nan, n, len(values), dropped)
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return Interval(estimate, float(low), float(high), n, len(values), dropped)


def mean_bootstrap(values: FloatArray, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                   seed: int = 0, indices: IntArray | None = None) -> Interval:
    """Percentile bootstrap of one mean of per-item scores (0/1 correctness, agreement); the same interval
    ``paired_mean_bootstrap`` gives each side on the same resamples."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0, 0)
    idx = indices if indices is not None else resample_indices(n, resamples, seed)
    return _interval(float(values.mean()), values[idx].mean(axis=1), n, level)


def paired_mean_bootstrap(
    teacher: FloatArray,
    student: FloatArray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    indices: IntArray | None = None,
) -> tuple[Interval, Interval, Interval, Interval]:
    """Vectorised paired bootstrap of per-item scores (0/1 correctness, refusals, JSON validity).

    Returns intervals for the teacher mean, the student mean, the difference (student - teacher) and the
    retention (student mean / teacher mean), all computed on the same resamples.
    """
    if teacher.shape != student.shape:
        raise UserError(
            f"paired scores need the same items: teacher has {len(teacher)}, student {len(student)}",
            hint="evaluate both models on the same item list",
        )
    n = len(teacher)
    if n == 0:
        empty = Interval(math.nan, math.nan, math.nan, 0, 0, 0)
        return empty, empty, empty, empty
    idx = indices if indices is not None else resample_indices(n, resamples, seed)
    t_boot = teacher[idx].mean(axis=1)
    s_boot = student[idx].mean(axis=1)
    t_hat, s_hat = float(teacher.mean()), float(student.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        r_boot = np.where(t_boot > 0, s_boot / np.where(t_boot > 0, t_boot, 1.0), np.nan)
    return (
        _interval(t_hat, t_boot, n, level),
        _interval(s_hat, s_boot, n, level),
        _interval(s_hat - t_hat, s_boot - t_boot, n, level),
        _interval(ratio(s_hat, t_hat), r_boot, n, level),
    )


def _interval(estimate: float, boot: FloatArray, n: int, level: float) -> Interval:
    finite = boot[~np.isnan(boot)]
    dropped = int(len(boot) - len(finite))
    if len(finite) == 0:
        return Interval(estimate, math.nan, math.nan, n, len(boot), dropped)
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return Interval(estimate, float(low), float(high), n, len(boot), dropped)


@dataclass(frozen=True)
class Flip:
    """An item the student lost (teacher right, student wrong) or gained (student right, teacher wrong)."""

    item_id: str
    text: str
    gold: str | None
    teacher: str | None
    student: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def flips(
    item_ids: Sequence[str],
    texts: Sequence[str],
    gold: Sequence[str | None],
    teacher: Sequence[str | None],
    student: Sequence[str | None],
) -> tuple[list[Flip], list[Flip]]:
    """(lost, gained): items where exactly one of the two models matches the gold label."""
    lost: list[Flip] = []
    gained: list[Flip] = []
    for i, item_id in enumerate(item_ids):
        if gold[i] is None:
            continue
        t_ok = teacher[i] == gold[i]
        s_ok = student[i] == gold[i]
        if t_ok and not s_ok:
            lost.append(Flip(item_id, texts[i], gold[i], teacher[i], student[i]))
        elif s_ok and not t_ok:
            gained.append(Flip(item_id, texts[i], gold[i], teacher[i], student[i]))
    return lost, gained
