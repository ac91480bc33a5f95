"""The two-sample tests behind ``distribution_shift`` and ``embedding_mmd``.

* ``outside_shift(k, n, q)``: -log10 of the exact binomial upper tail P(X >= k), X ~ Bin(n, q): ``k`` of a window's
  ``n`` embedded prompt pieces fell outside the approved reference, where the reference's own held-out pieces fall
  outside at rate ``q``. This compares two samples' outside rates (the window's and the reference's); it is the
  test that adds up slow mixing (10 % malicious pieces among approved ones) because each malicious piece is
  individually far from the reference.
* ``MMDTest``: unbiased MMD^2 with an RBF kernel (bandwidth: median heuristic on the reference) between a window
  of embeddings and the reference, against a threshold calibrated on same-distribution windows drawn from the
  reference itself (``calibration`` draws, the ``level`` quantile, times ``margin``). Sees a shift of the whole
  window's distribution (e.g. a project's traffic turning to another topic) even when no single piece is an
  outlier.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=65536)
def outside_shift(k: int, n: int, q: float) -> float:
    """-log10 P(X >= k) for X ~ Binomial(n, q); 0 when k is not above the expectation."""
    if n <= 0 or k <= n * q:
        return 0.0
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lq + (n - i) * l1q
             for i in range(k, n + 1)]
    top = max(terms)
    log_p = top + math.log(sum(math.exp(t - top) for t in terms))
    return max(0.0, -log_p / math.log(10))


@cache
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _one_thread() -> Any:
    """BLAS on one thread: these products are small, and a BLAS thread pool fighting the gateway's own threads for a
    shared CPU made them ten times slower (measured on the 2-core development machine)."""
    return _controller().limit(limits=1, user_api="blas")


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)  # type: ignore[no-any-return]


def _within(x: np.ndarray, gamma: float) -> float:
    """Mean kernel value between distinct rows of ``x`` (the unbiased within-sample term)."""
    m = len(x)
    k = np.exp(-gamma * _sqdist(x, x))
    return float((k.sum() - np.trace(k)) / (m * (m - 1)))


def mmd2(x: np.ndarray, y: np.ndarray, gamma: float, y_within: float | None = None) -> float:
    """Unbiased MMD^2 between samples ``x`` (m, d) and ``y`` (r, d) with kernel exp(-gamma |a - b|^2);
    ``y_within``: ``y``'s within-sample term when it is known already."""
    syy = _within(y, gamma) if y_within is None else y_within
    kxy = np.exp(-gamma * _sqdist(x, y))
    return float(_within(x, gamma) + syy - 2.0 * kxy.mean())


class MMDTest:
    """A reference's MMD two-sample test; ``ratio(window)`` is MMD^2 / calibrated threshold (>= 1: shifted).
    Windows are compared with a fixed sample of the reference; the threshold is calibrated on windows drawn from
    the rest of it."""

    def __init__(self, reference: np.ndarray, *, sample: int = 300, calibration: int = 100, level: float = 0.99,
                 margin: float = 3.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        ref = np.asarray(reference, dtype=np.float32)
        self._ref = ref
        self._rng = rng
        idx = rng.choice(len(ref), size=min(len(ref), 300), replace=False)
        sub = ref[idx]
        d = _sqdist(sub, sub)[np.triu_indices(len(sub), 1)]
        self.gamma = 1.0 / max(float(np.median(d)), 1e-6)
        self.sample = sample
        self.calibration = calibration
        self.level = level
        self.margin = margin
        self._thresholds: dict[int, float] = {}
        # the fixed reference sample windows are compared with, and its within-sample term (computed once)
        with _one_thread():
            self._setup(ref, rng, sample)

    def _setup(self, ref: np.ndarray, rng: np.random.Generator, sample: int) -> None:
        order = rng.permutation(len(ref))
        self._rest = ref[order[:sample]]
        self._pool = ref[order[sample:]]  # calibration windows come from here: never overlapping the sample
        self._rest_within = _within(self._rest, self.gamma)

    def threshold(self, m: int) -> float:
        """The calibrated MMD^2 threshold for windows of ``m`` points (computed once per size)."""
        hit = self._thresholds.get(m)
        if hit is not None:
            return hit
        with _one_thread():
            return self._calibrate(m)

    def _calibrate(self, m: int) -> float:
        pool = self._pool
        # windows drawn from a finite pool vary less than windows of fresh traffic (the finite-population
        # correction, (P - m) / (P - 1)): the margin (3x the 99th percentile by default) covers it
        if len(pool) < m:
            raise ValueError(f"the reference has {len(pool)} points beside its sample; windows of {m} need more")
        null = [mmd2(pool[self._rng.choice(len(pool), size=m, replace=False)], self._rest, self.gamma,
                     self._rest_within) for _ in range(self.calibration)]
        value = self._thresholds[m] = max(float(np.quantile(null, self.level)) * self.margin, 1e-6)
        return value

    def ratio(self, window: np.ndarray) -> float:
        x = np.asarray(window, dtype=np.float32)
        threshold = self.threshold(len(x))
        with _one_thread():
            return mmd2(x, self._rest, self.gamma, self._rest_within) / threshold
