"""Options and helpers shared by the CLI nouns."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DB = "./distillgate.db"


def default_db() -> str:
    """``--db`` default: ``$DISTILLGATE_DB``, else ``./distillgate.db``."""
    return os.environ.get("DISTILLGATE_DB") or DEFAULT_DB


def db_option(func: F) -> F:
    """The ``--db PATH|URL`` option every store-touching command takes (docs/deploy.md for PostgreSQL)."""
    return click.option(
        "--db",
        "db",
        default=default_db,
        show_default="$DISTILLGATE_DB or ./distillgate.db",
        type=click.Path(dir_okay=False),
        help="Store holding quotas and the decision log: a SQLite file or a postgresql://user@host:port/db URL.",
    )(func)
