"""What a decision-log entry stores, and what the ``log`` table derives from it.

Two rules keep the log trustworthy and small:

* **Columns are derived from the hashed body.** The ``log`` table keeps ``kind``, ``ts``, ``run``, ``project`` and
  ``user`` as columns so reads can select on them; each is a copy of the body's field of the same name
  (``columns``). ``audit verify`` fails on any row whose columns differ from its body, and reads re-check the body
  of every row they select, so an edited column can neither pass verification nor put a row into an export.
* **A denial stores a bounded entry.** A request the gateway denies can come from anyone (no key, any headers).
  ``bound_denial`` caps each identity value at ``IDENTITY_CHARS`` characters (a longer one keeps its first
  characters, its length and its sha256, so two long values stay distinct) and the message at ``MESSAGE_CHARS``;
  an unauthenticated denial stores no request content and no extraction evidence (an authenticated one keeps
  them, identity values bounded the same way; its content is bounded by the gateway's ``max_body_bytes``). So a
  denied request without a valid key adds at most ``DENIAL_MAX_BYTES`` to the log, whatever it sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distillgate.canonical import sha256_hex

#: table columns that are copies of the body field of the same name (in the order of the INSERT; ``columns``)
COLUMNS = ("kind", "ts", "run", "project", "user")
IDENTITY_FIELDS = ("user", "project", "run", "model", "output_type", "destination", "key_id")
IDENTITY_CHARS = 128
MESSAGE_CHARS = 1024
#: the most a denied, unauthenticated request adds to the log (the fixed fields, bounded values, JSON overhead)
DENIAL_MAX_BYTES = 4096


def columns(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """The derived column values of an entry body, in ``COLUMNS`` order (spelled out: two of these per request)."""
    get = body.get
    return get("kind"), get("ts"), get("run"), get("project"), get("user")


def bounded(value: Any, limit: int) -> Any:
    """``value`` if it is not a string longer than ``limit``; else its head, length and sha256 (still a string)."""
    if not isinstance(value, str) or len(value) <= limit:
        return value
    digest = sha256_hex(value.encode("utf-8", "surrogatepass"))
    return f"{value[: limit // 2]}…[{len(value)} chars, sha256 {digest}]"


def bound_denial(fields: dict[str, Any], *, authenticated: bool) -> dict[str, Any]:
    """The fields of a denied decision with every caller-chosen value bounded (see the module docstring)."""
    out = dict(fields)
    for name in IDENTITY_FIELDS:
        if name in out:
            out[name] = bounded(out[name], IDENTITY_CHARS)
    out["message"] = bounded(out.get("message"), MESSAGE_CHARS)
    if not authenticated:
        out.pop("content", None)
        out.pop("extra", None)
    elif "extra" in out:  # extraction evidence repeats the identity (extra.extraction.features.user, ...)
        out["extra"] = _bound_identities(out["extra"])
    return out


def _bound_identities(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: bounded(v, IDENTITY_CHARS) if k in IDENTITY_FIELDS else _bound_identities(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_bound_identities(v) for v in value]
    return value
