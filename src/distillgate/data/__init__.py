"""The dataset builder: rows, ingest, filters, dedup, normalisation, review, splits, versions, export.

Public API (see docs/dataset.md):

- ``Row``, ``SCHEMA_VERSION`` (``schema``); ``DatasetConfig``, ``load_config`` (``config``)
- ``WorkingCopy``, ``GeneratedSample``, ``append_generated`` (``store``); ``ingest_file`` (``ingest``)
- ``build``, ``process`` (``pipeline``); ``leakage_check`` (``leakage``); review functions (``review``)
- ``freeze``, ``open_version``, ``load_version``, ``diff`` (``versions``); ``export_version`` (``export``)
- ``ensure_trainable`` (``guard``): training refuses golden, test and holdout rows

Heavy modules are imported lazily so ``import distillgate.data.guard`` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Row": "schema", "SCHEMA_VERSION": "schema",
    "DatasetConfig": "config", "load_config": "config",
    "WorkingCopy": "store", "GeneratedSample": "store", "AppendResult": "store", "append_generated": "store",
    "ingest_file": "ingest",
    "build": "pipeline", "process": "pipeline",
    "leakage_check": "leakage",
    "freeze": "versions", "open_version": "versions", "load_version": "versions", "diff": "versions",
    "export_version": "export",
    "ensure_trainable": "guard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distillgate.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"distillgate.data.{module}"), name)
