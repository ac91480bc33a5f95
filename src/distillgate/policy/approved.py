"""Approved research shapes, declared per project in the policy's ``extraction.approved`` section.

A project states what its approved distillation research sends: the output types, whether logprobs are asked for
and how many alternatives (``top_logprobs``), how many completions per prompt (``n``), the ``max_tokens`` range,
how often one prompt may be resampled, the prompt templates (by id, with their text) and the expected run size.
The extraction monitor judges requests against this declaration instead of guessing: a request that fits a declared
shape is never "logprob harvesting" (a declared soft-label KD study with ``max_tokens: 1, top_logprobs: 20, n: 4``
resampling its prompts is exactly what was approved), the declared run size is what ``volume`` compares with, and a
templated prompt's variable part (the prompt minus its approved template) is what the content signals look at.

    extraction:
      approved:
        bank-kd:                        # project
          - name: soft-label-kd
            output_types: [logits]
            top_logprobs: 20            # at most this many alternatives; 0 = no logprobs
            n: 4                        # at most this many completions per request
            max_tokens: 1               # at most
            resamples: 8                # one prompt may be sent this many times in a window
            run_size: 12000             # expected records (requests x n) per run
            templates:
              intent77: "Classify ... Intents: ...\\nMessage: {input}"
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

SLOT = "{input}"


class ApprovedShape(BaseModel):
    """One approved research shape of a project. Every limit is an upper bound; unset means "not declared"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="approved", min_length=1)
    output_types: tuple[str, ...] | None = Field(default=None, description="None: any of the policy's outputs")
    top_logprobs: int = Field(default=0, ge=0, le=100, description="most logprob alternatives; 0: no logprobs")
    n: int = Field(default=1, ge=1, le=128, description="most completions per request")
    max_tokens: int | None = Field(default=None, ge=1, description="most tokens per completion")
    resamples: int = Field(default=1, ge=1, le=10_000, description="times one prompt may be sent in a window")
    run_size: int | None = Field(default=None, ge=1, description="expected records (requests x n) per run")
    templates: dict[str, str] = Field(default_factory=dict, description="template id -> text with {input} slots")

    @field_validator("templates")
    @classmethod
    def _slotted(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        for tid, text in value.items():
            if SLOT not in text:
                raise ValueError(f"template {tid!r} has no {SLOT} slot: mark where the variable input goes")
        return value

    def fits(self, *, output_type: str | None, top_logprobs: int, logprobs: bool, n: int,
             max_tokens: int | None) -> bool:
        """Whether a request of this shape is what the declaration approved (templates are judged separately)."""
        if self.output_types is not None and output_type not in self.output_types:
            return False
        if (logprobs or top_logprobs > 0) and self.top_logprobs == 0:
            return False
        if top_logprobs > self.top_logprobs or n > self.n:
            return False
        return not (self.max_tokens is not None and (max_tokens is None or max_tokens > self.max_tokens))


def template_hash(text: str) -> str:
    """sha256 (first 16 hex digits) of a template's text: what the decision log records of a matched template."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
