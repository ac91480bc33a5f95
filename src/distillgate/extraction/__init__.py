"""Extraction-abuse detection: signals over sliding windows of a user's, key's, project's and run's traffic.

Seam for the gateway (per request, before ``store.aadmit``)::

    features = RequestFeatures.from_openai(body, user=..., key_id=..., project=..., run=..., output_type=...)
    signals = monitor.observe(features)                       # cheap; embeddings run in the background
    request = dataclasses.replace(request, signals=signals)   # decide() maps them by the policy's extraction rules
    await store.aadmit(policies, request, key_id=..., extra=log_extra(features, signals))
"""

from distillgate.extraction.embed import Embedder, HashingEmbedder, MiniLMEmbedder, Reference
from distillgate.extraction.features import RequestFeatures, Sketch, features_record
from distillgate.extraction.monitor import ExtractionMonitor, log_extra
from distillgate.policy.extraction_rules import ExtractionRules, Signal, SignalRule

__all__ = [
    "Embedder", "ExtractionMonitor", "ExtractionRules", "HashingEmbedder", "MiniLMEmbedder", "Reference",
    "RequestFeatures", "Signal", "SignalRule", "Sketch", "features_record", "log_extra",
]
