"""``key=value`` overrides for YAML configs (torchtune style): ``train.epochs=2 teacher.model=local/x``.

The value is parsed as a YAML scalar/flow value, so ``2`` is an int, ``true`` a bool, ``[a, b]`` a list and
``null`` None. Dotted keys create intermediate mappings; list items are addressed by index (``suites.0=xstest``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from distillgate.errors import ConfigError, ConfigIssue


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError("overrides", [ConfigIssue(text, "an override must look like key.path=value",
                                                    "e.g. train.epochs=2")])
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError("overrides", [ConfigIssue(text, "empty key in override", "e.g. train.epochs=2")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError("overrides", [ConfigIssue(key, f"cannot parse value {raw!r}: {exc}")]) from exc
    return parts, value


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``doc`` with every override applied (all bad overrides reported at once)."""
    import copy

    out = copy.deepcopy(doc)
    issues: list[ConfigIssue] = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ConfigError as exc:
            issues.extend(exc.issues)
            continue
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    issues.append(ConfigIssue(".".join(parts[: i + 1]), f"no list item {part}"))
                    break
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                issues.append(ConfigIssue(".".join(parts[: i + 1]), "is not a mapping; cannot set a key below it"))
                break
        else:
            last = parts[-1]
            if isinstance(node, list):
                if not last.isdigit() or int(last) > len(node):
                    issues.append(ConfigIssue(".".join(parts), f"no list item {last}"))
                elif int(last) == len(node):
                    node.append(value)
                else:
                    node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:  # e.g. name.first=a where name is a string
                issues.append(ConfigIssue(".".join(parts[:-1]), "is not a mapping; cannot set a key below it"))
    if issues:
        raise ConfigError("overrides", issues)
    return out
