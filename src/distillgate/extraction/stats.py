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
from functools import lru_cache

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


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)  # type: ignore[no-any-return]


def mmd2(x: np.ndarray, y: np.ndarray, gamma: float) -> float:
    """Unbiased MMD^2 between samples ``x`` (m, d) and ``y`` (r, d) with kernel exp(-gamma |a - b|^2)."""
    m, r = len(x), len(y)
    kxx = np.exp(-gamma * _sqdist(x, x))
    kyy = np.exp(-gamma * _sqdist(y, y))
    kxy = np.exp(-gamma * _sqdist(x, y))
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (r * (r - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


class MMDTest:
    """A reference's MMD two-sample test; ``ratio(window)`` is MMD^2 / calibrated threshold (>= 1: shifted)."""

    def __init__(self, reference: np.ndarray, *, sample: int = 400, calibration: int = 40, level: float = 0.99,
                 margin: float = 1.5, seed: int = 0) -> None:
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

    def threshold(self, m: int) -> float:
        """The calibrated MMD^2 threshold for windows of ``m`` points (computed once per size)."""
        hit = self._thresholds.get(m)
        if hit is not None:
            return hit
        ref = self._ref
        null = []
        for _ in range(self.calibration):
            perm = self._rng.permutation(len(ref))
            win, rest = ref[perm[:m]], ref[perm[m:m + self.sample]]
            null.append(mmd2(win, rest, self.gamma))
        value = self._thresholds[m] = max(float(np.quantile(null, self.level)) * self.margin, 1e-6)
        return value

    def ratio(self, window: np.ndarray) -> float:
        ref = self._ref
        rest = ref if len(ref) <= self.sample else ref[self._rng.choice(len(ref), self.sample, replace=False)]
        return mmd2(window, rest, self.gamma) / self.threshold(len(window))
