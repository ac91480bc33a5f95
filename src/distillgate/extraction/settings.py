"""The extraction monitor's settings (the gateway config's ``extraction`` section) and ``build_monitor``.

They live here, not in the gateway, so that the child process (``distillgate.extraction.process``) builds its
monitor without importing the gateway: imports run one way, gateway -> extraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from distillgate.errors import ConfigIssue
from distillgate.extraction.embed import make_embedder, read_reference
from distillgate.extraction.monitor import ExtractionMonitor
from distillgate.policy.model import PolicySet


class ExtractionSettings(BaseModel):
    """The gateway's ``ExtractionMonitor``: which embedder computes the content signals (``prompt_drift``,
    ``distribution_shift``, ``embedding_mmd``), each project's approved reference, and how long a request may wait
    for room in the embedder's queue. Without an embedder, every other signal still runs."""

    model_config = ConfigDict(extra="forbid")

    embedder: Literal["none", "minilm", "hashing"] = "none"
    references: dict[str, str] = Field(default_factory=dict)
    reference_size: int = Field(default=200, ge=10)
    embed_cache: int = Field(default=4096, ge=0)
    queue_size: int = Field(default=1024, ge=1)
    embed_wait_s: float = Field(default=5.0, ge=0)  # back-pressure: a request waits this long for queue room
    process: bool = False  # run the monitor in a child process, beside the event loop (docs/gateway.md)
    #: share the windows with every other worker and replica on the same ``--db`` (extraction/shared.py)
    shared: bool = True
    #: one round of sharing (commit what this process judged, read what the others did) per this many seconds
    share_interval_s: float = Field(default=0.1, gt=0, le=10)
    share_backfill: int = Field(default=10_000, ge=0)  # rows a (re)started process reads first

    def issues(self) -> list[ConfigIssue]:
        out: list[ConfigIssue] = []
        if self.references and self.embedder == "none":
            out.append(ConfigIssue("extraction.references", "references need an embedder",
                                   "set extraction.embedder: minilm (or hashing)"))
        for project, path in self.references.items():
            if not Path(path).is_file():
                out.append(ConfigIssue(f"extraction.references.{project}", f"{path} is not a file",
                                       "give a .jsonl of request bodies or a text file, one prompt per line"))
        return out


def build_monitor(policies: PolicySet, settings: ExtractionSettings, db: str | None = None) -> ExtractionMonitor:
    """The extraction monitor with the configured embedder; each configured reference is embedded now (through the
    project's approved templates, so the reference holds what requests' pieces are compared with). With ``db``
    (and ``shared``), its windows are shared with every other process on that store."""
    embedder = None if settings.embedder == "none" else make_embedder(settings.embedder)
    monitor = ExtractionMonitor(policies, embedder=embedder, reference_size=settings.reference_size,
                                embed_cache=settings.embed_cache, queue_size=settings.queue_size)
    for project, path in settings.references.items():
        monitor.set_reference(project, read_reference(path))
    if db is not None and settings.shared:
        monitor.share(db, interval_s=settings.share_interval_s, backfill=settings.share_backfill)
    return monitor
