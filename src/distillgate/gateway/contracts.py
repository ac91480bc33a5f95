"""Output contracts: check a teacher's answer against the policy's contract for the declared output type."""

from __future__ import annotations

from functools import lru_cache

import jsonschema
import orjson

from distillgate.policy import OutputContract


@lru_cache(maxsize=64)
def _validator(schema_json: bytes) -> jsonschema.protocols.Validator:
    schema = orjson.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def check_output(contract: OutputContract, text: str | None) -> list[str]:
    """Every way ``text`` breaks ``contract`` (empty list when it conforms)."""
    problems: list[str] = []
    value = text or ""
    if contract.max_chars is not None and len(value) > contract.max_chars:
        problems.append(f"answer has {len(value)} characters > max_chars {contract.max_chars}")
    if contract.min_chars is not None and len(value) < contract.min_chars:
        problems.append(f"answer has {len(value)} characters < min_chars {contract.min_chars}")
    if contract.labels is not None and value.strip() not in contract.labels:
        shown = ", ".join(contract.labels[:10]) + (" ..." if len(contract.labels) > 10 else "")
        problems.append(f"answer {value.strip()[:60]!r} is not one of the labels ({shown})")
    if contract.json_schema is not None:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            problems.append(f"answer is not JSON: {exc}")
        else:
            validator = _validator(orjson.dumps(contract.json_schema, option=orjson.OPT_SORT_KEYS))
            for err in list(validator.iter_errors(doc))[:5]:
                where = "/".join(str(p) for p in err.absolute_path) or "<root>"
                problems.append(f"JSON schema violation at {where}: {err.message}")
    return problems
