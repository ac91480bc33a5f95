"""Provenance stamps: an Ed25519 signature over the canonical JSON of who asked what, under which policy decision.

A stamp's ``payload`` holds: ``v`` (format version), ``entry_index`` and ``entry_hash`` (the decision-log entry that
allowed the request), ``policy_id``, ``policy_hash``, ``user``, ``project``, ``run``, ``model``, ``upstream_id``,
``request_hash`` (sha256 of the request body bytes as received), ``response_hash`` (see
:func:`distillgate.gateway.answer.answer_digest`: every field a dataset row keeps, and the model),
``issued_at`` (UTC ISO-8601) and ``key_id``. ``signature`` is base64 Ed25519 over ``canonical_json(payload)``.

On the wire it travels twice: in the ``X-Distillgate-Stamp`` header as ``base64url(canonical_json(stamp))`` and in
the body's ``distillgate.stamp`` object (streaming: in a last chunk with ``choices: []`` before ``[DONE]``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from distillgate.canonical import canonical_json
from distillgate.errors import IntegrityError
from distillgate.ledger.records import iso_now
from distillgate.ledger.signing import Signer, verify_json

STAMP_VERSION = 2  # 2: response_hash is answer_digest (all kept fields + model); 1 hashed text only
STAMP_HEADER = "x-distillgate-stamp"
PAYLOAD_KEYS = ("v", "entry_index", "entry_hash", "policy_id", "policy_hash", "user", "project", "run", "model",
                "upstream_id", "request_hash", "response_hash", "issued_at", "key_id")


@dataclass(frozen=True)
class Stamp:
    payload: dict[str, Any]
    signature: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.payload, "signature": self.signature}

    def header_value(self) -> str:
        return base64.urlsafe_b64encode(canonical_json(self.as_dict())).decode().rstrip("=")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stamp:
        missing = [k for k in (*PAYLOAD_KEYS, "signature") if k not in data]
        if missing:
            raise IntegrityError(f"stamp lacks {', '.join(missing)}",
                                 hint="pass the body's distillgate.stamp object or the X-Distillgate-Stamp header")
        return cls({k: data[k] for k in PAYLOAD_KEYS}, str(data["signature"]))

    @classmethod
    def from_response(cls, response: Any) -> Stamp:
        """The stamp of a gateway answer: a response dict, an openai SDK object (``model_extra``), or the last
        chunk of a stream."""
        extra = response if isinstance(response, Mapping) else (getattr(response, "model_extra", None) or {})
        block = extra.get("distillgate") if isinstance(extra, Mapping) else None
        if not isinstance(block, Mapping) or not isinstance(block.get("stamp"), Mapping):
            raise IntegrityError("the response carries no distillgate.stamp",
                                 hint="was it answered by the distillgate gateway? streams carry it in the last chunk")
        return cls.from_dict(block["stamp"])

    @classmethod
    def from_header(cls, value: str) -> Stamp:
        try:
            raw = base64.urlsafe_b64decode(value.strip() + "=" * (-len(value.strip()) % 4))
            data = orjson.loads(raw)
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"not a stamp header value: {exc}") from exc
        if not isinstance(data, dict):
            raise IntegrityError("stamp header does not decode to an object")
        return cls.from_dict(data)

    def verify(self, public_key_pem: str | bytes) -> bool:
        return verify_json(public_key_pem, self.payload, self.signature)


def issue_stamp(signer: Signer, *, entry_index: int, entry_hash: str, policy_id: str, policy_hash: str,
                user: str | None, project: str | None, run: str | None, model: str | None,
                upstream_id: str | None, request_hash: str, response_hash: str,
                issued_at: datetime | None = None) -> Stamp:
    # "%Y-%m-%dT%H:%M:%S.%fZ": now, from the log's clock (its text up to the second made once a second); a given
    # time, written by isoformat (a third of strftime's cost)
    when = iso_now() if issued_at is None else \
        issued_at.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    payload = {"v": STAMP_VERSION, "entry_index": entry_index, "entry_hash": entry_hash, "policy_id": policy_id,
               "policy_hash": policy_hash, "user": user, "project": project, "run": run, "model": model,
               "upstream_id": upstream_id, "request_hash": request_hash, "response_hash": response_hash,
               "issued_at": when, "key_id": signer.key_id}
    return Stamp(payload, signer.sign_json(payload))
