"""The gateway's configuration (``gateway.yaml``); unknown keys are rejected and every problem is reported at once.

    host: 127.0.0.1
    port: 8080
    db: ./distillgate.db
    policy: examples/policies/            # a policy file or a directory of them
    upstreams:
      openai:
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY
        timeout_s: 120
        connect_timeout_s: 5
        max_retries: 2
        backoff_s: 0.2
        max_connections: 256
    models:                               # model name (glob) -> upstream name; first match wins
      gpt-4o-mini: openai
      "*": openai
    screens: [credentials, extraction]    # or "package.module:attr"
    max_body_bytes: 1048576
    max_header_bytes: 32768               # all request headers together; more is answered 431
    body_timeout_s: 30                    # a body not fully received by then is answered 408
    max_body_readers: 256                 # requests still sending their bodies at once; more are answered 503
    max_connections: 4096                 # open connections + requests (uvicorn limit_concurrency); more get 503
    local_models:                         # name -> spec of the in-process teachers requests may name local/NAME
      smollm2-135m-instruct: local/smollm2-135m-instruct   # (the default); a spec may be a .gguf path or a model dir
    students:                             # name -> a trained student's artefact (requests name student/NAME)
      banking: runs/r1/train/out          # the output_dir (or its model/) that `distillgate train` wrote (an
                                          # encoder classifier or a causal LM: teachers/student.py)
    routes:                               # routed model name -> student/teacher cascade (gateway/routes.py)
      banking-intent: {student: banking, teacher: fake-teacher, threshold: runs/r1/threshold.json}
    reclaim_interval_s: 30
    reservation_ttl_s: 600                # a reservation not settled by then is refunded by reclaim
    settle: before_reply                  # or after_reply (see docs/gateway.md)
    extraction:                           # the extraction monitor's prompt embeddings (docs/extraction.md)
      embedder: minilm                    # none (default) | minilm | hashing
      references:                         # project -> its approved prompts, for prompt_drift
        internal-compression: data/approved_prompts.jsonl
      process: false                      # true: the monitor runs in a child process, on another core
    witness: /mnt/append-only/distillgate.witness.jsonl   # signed heads, outside the store (docs/audit.md)

Routing of a model name: the ``models`` table (glob patterns, first match); else ``UPSTREAM/rest`` goes to that
upstream with ``rest`` as the model; else ``local/NAME`` goes to the in-process teacher registered as NAME in
``local_models`` (a request never names a path: an unregistered name is refused the same way whatever is on disk);
else ``student/NAME`` goes to the trained student registered as NAME in ``students``; a name under ``routes`` is
answered by its student or its teacher (docs/gateway.md, "Routes"); else, when exactly one upstream is configured, that one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

__all__ = ["ExtractionSettings", "GatewayConfig", "UpstreamSettings", "config_from_data", "load_config"]

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillgate.errors import ConfigError, ConfigIssue
from distillgate.extraction.settings import ExtractionSettings
from distillgate.gateway.routes import RouteSettings, route_issues
from distillgate.policy.model import issues_from_validation, parse_document
from distillgate.teachers.http import HttpUpstreamConfig
from distillgate.teachers.student import artefact_issue

DEFAULT_LOCAL_SPEC = "local/smollm2-135m-instruct"
#: what a registered local model name may look like (requests name it as ``local/NAME``)
LOCAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpstreamSettings(_Strict):
    base_url: str
    api_key_env: str | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    backoff_s: float = Field(default=0.2, ge=0)
    max_backoff_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=256, ge=1)

    def to_http(self, name: str) -> HttpUpstreamConfig:
        return HttpUpstreamConfig(name=name, **self.model_dump())


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    db: str = "./distillgate.db"
    #: processes serving the one port (``gateway serve --workers``; gateway/workers.py)
    workers: int = Field(default=1, ge=1, le=64)
    policy: str
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=dict)
    screens: list[str] = Field(default_factory=lambda: ["credentials", "extraction"])
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_header_bytes: int = Field(default=32 << 10, ge=1024)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_body_readers: int = Field(default=256, ge=1)
    max_connections: int = Field(default=4096, ge=1)
    local_models: dict[str, str] = Field(default_factory=lambda: {"smollm2-135m-instruct": DEFAULT_LOCAL_SPEC})
    #: name -> a trained student's artefact directory; requests name it student/NAME
    students: dict[str, str] = Field(default_factory=dict)
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    reclaim_interval_s: float = Field(default=30.0, gt=0)
    reservation_ttl_s: float = Field(default=600.0, gt=0)
    access_log: bool = False
    settle: Literal["before_reply", "after_reply"] = "before_reply"
    extraction: ExtractionSettings = Field(default_factory=ExtractionSettings)
    #: the file every signed log head is appended to (docs/audit.md); default $DISTILLGATE_WITNESS or <db>.witness.jsonl
    witness: str | None = None

    def check(self, source: str) -> None:
        """Cross-field checks pydantic cannot express; raises ConfigError with every issue."""
        issues: list[ConfigIssue] = []
        for pattern, upstream in self.models.items():
            if upstream not in self.upstreams and upstream != "local":
                issues.append(ConfigIssue(f"models.{pattern}", f"upstream {upstream!r} is not configured",
                                          f"use one of {[*sorted(self.upstreams), 'local']}"))
        for name, up in self.upstreams.items():
            issues.extend(up.to_http(name).issues(f"upstreams.{name}."))
            if "/" in name:
                issues.append(ConfigIssue(f"upstreams.{name}", "upstream names cannot contain '/'",
                                          "rename it, e.g. my-upstream"))
        for name, up in self.upstreams.items():
            longest = up.timeout_s * (up.max_retries + 1) + up.max_backoff_s * up.max_retries
            if self.reservation_ttl_s <= longest:
                issues.append(ConfigIssue("reservation_ttl_s", f"{self.reservation_ttl_s:g} s is not longer than the "
                                          f"longest request to upstream {name!r} ({longest:g} s with retries), so "
                                          "reclaim could refund a request still in flight",
                                          f"set reservation_ttl_s above {longest:g} or lower upstreams.{name}.timeout_s"))
        for name in self.local_models:
            if not LOCAL_NAME.fullmatch(name):
                issues.append(ConfigIssue(f"local_models.{name}", "a local model name is letters, digits and . _ - "
                                          "(no path, no spaces)", "register the path as the value, under a plain name"))
        for name, artefact in self.students.items():
            if not LOCAL_NAME.fullmatch(name):
                issues.append(ConfigIssue(f"students.{name}", "a student name is letters, digits and . _ - "
                                          "(no path, no spaces)", "register the path as the value, under a plain name"))
            elif (problem := artefact_issue(artefact)) is not None:
                issues.append(ConfigIssue(f"students.{name}", problem,
                                          "give the output_dir (or its model/) that `distillgate train` wrote"))
        issues.extend(route_issues(self.routes, self.students))
        issues.extend(self.extraction.issues())
        if not Path(self.policy).exists():
            issues.append(ConfigIssue("policy", f"{self.policy} does not exist", "give a policy file or directory"))
        if issues:
            raise ConfigError(source, issues)


def config_from_data(data: Any, source: str = "<gateway config>") -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("", "the gateway config must be a mapping", "start with policy: ...")])
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, issues_from_validation(GatewayConfig, exc)) from exc
    cfg.check(source)
    return cfg


def load_config(path: str | Path) -> GatewayConfig:
    return config_from_data(parse_document(Path(path)), str(path))
