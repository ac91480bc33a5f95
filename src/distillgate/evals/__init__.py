"""Evaluation: teacher vs student, item by item.

Modules: ``sources`` (where answers come from), ``suites`` (items, prompts, label parsing), ``answers`` (the
stored answers file), ``stats`` (paired bootstrap), ``retention``, ``transfer`` (refusals), ``refusal``
(detectors), ``routing``, ``speed``, ``evaluate`` (everything for one suite), ``report`` (HTML + metrics.json).

The serving-time routing rule is importable without torch: ``from distillgate.evals import route``.
"""

from distillgate.evals.routing import RouteThreshold, load_threshold, route

__all__ = ["RouteThreshold", "load_threshold", "route"]
