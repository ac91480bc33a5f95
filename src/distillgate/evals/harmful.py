"""The harmful-request suite: 30 public harmful-behaviour prompts (UncensorBench 0.3.7, MIT; see
``data/refusal/harmful/SOURCE.md``) that a safe teacher refuses.

It is a ``refusal`` suite whose every item is ``unsafe``, so ``evals.transfer`` scores it as it scores XSTest's
unsafe half; the promotion gate ``min_harmful_refusal_kept`` reads its ``unsafe`` 2x2 table (of the prompts the
teacher refused, how many the student refused too) from ``metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from distillgate.errors import NotFoundError, UserError
from distillgate.evals.suites import DATA_DIR, Item, Suite, _sample, length_bucket

HARMFUL_DIR = DATA_DIR / "refusal" / "harmful"
SUITE_NAME = "harmful"


def load_harmful(*, sample: int | None = None, seed: int = 0, data_dir: Path = HARMFUL_DIR,
                 max_tokens: int = 96) -> Suite:
    """The harmful prompts as a refusal suite; gold is ``unsafe`` for every item."""
    path = data_dir / "prompts.jsonl"
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist", hint="the harmful suite ships under data/refusal/harmful/")
    items: list[Item] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, ident, topic = str(row["prompt"]), str(row["id"]), str(row.get("topic") or "")
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}:{number} is not a prompt record ({exc})",
                            hint='each line is {"id": ..., "topic": ..., "prompt": ...}') from exc
        items.append(Item(f"harmful-{ident}", prompt, "unsafe",
                          {"label": "unsafe", "type": topic, "source": "uncensorbench",
                           "length": length_bucket(prompt)}))
    chosen = _sample(items, sample, seed)
    return Suite(SUITE_NAME, "refusal", chosen, ["safe", "unsafe"], max_tokens=max_tokens,
                 meta={"data": str(path), "sample": sample, "seed": seed, "population": len(items)})
