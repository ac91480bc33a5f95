"""Keep secrets out of the files a run writes (metrics, reports, bundles, logs).

Three tools, used wherever a command line, a URL or a configuration is recorded:

* ``redact_argv``: the value of every option whose name says it is secret (``--api-key``, ``--password``,
  ``--token``, ``--secret``, ``--credentials``; ``--opt VALUE`` and ``--opt=VALUE``) becomes ``***``, and so does
  the password of any URL in an argument (``https://user:pw@host``).
* ``redact_url``: the password of every URL in a string becomes ``***``.
* ``scrub``: every occurrence of the given secret values anywhere in a JSON-like value becomes ``***`` (the last
  line of defence: a secret that reached a record by a path nobody thought of is still removed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

MASK = "***"
_SECRET_OPTION = re.compile(r"^--?[\w-]*(?:api[-_]?key|password|passwd|token|secret|credential)[\w-]*$", re.I)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@\s:]*):[^/@\s]*@", re.I)


def redact_url(text: str) -> str:
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


def redact_argv(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if arg.startswith("-") and _SECRET_OPTION.match(name):
            if eq:
                out.append(f"{name}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_url(arg))
    return out


def scrub(value: Any, secrets: Iterable[str | None]) -> Any:
    """``value`` with every secret (strings of 4+ characters) replaced by ``***``, recursively."""
    found = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
    if not found:
        return value

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            for secret in found:
                v = v.replace(secret, MASK)
            return v
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x) for x in v]
        return v

    return walk(value)
