"""docs/gateway.md cannot drift: every config key, serve flag and metric is documented."""

from __future__ import annotations

from pathlib import Path

from distillgate.cli.gateway_cmd import serve
from distillgate.gateway.config import ExtractionSettings, GatewayConfig, UpstreamSettings
from distillgate.gateway.metrics import Metrics

DOC = (Path(__file__).resolve().parent.parent / "docs" / "gateway.md").read_text()


def test_every_config_key_is_documented() -> None:
    missing = [k for k in GatewayConfig.model_fields if k != "upstreams" and f"| `{k}" not in DOC]
    missing += [k for k in UpstreamSettings.model_fields if f"`upstreams.<name>.{k}`" not in DOC]
    missing += [k for k in ExtractionSettings.model_fields if f"| `extraction.{k}" not in DOC]
    assert not missing, f"document these keys in docs/gateway.md: {missing}"


def test_every_serve_flag_is_documented() -> None:
    flags = [opt for p in serve.params for opt in getattr(p, "opts", []) if opt.startswith("--")]
    assert flags and not [f for f in flags if f"`{f}" not in DOC]


def test_every_metric_is_documented() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    assert names and not [n for n in names if n not in DOC and n.removesuffix("_total") not in DOC]
