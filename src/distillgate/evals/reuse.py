"""Teacher answers for a project's own split, reused from the run that labelled it, with a live check.

The project suite's items are rows of the frozen dataset version: the teacher already answered each of them in the
``generate`` stage, through the gateway, with the request the evaluation would send again (the same system prompt,
the same input, the same label set, temperature 0), and the answer is stored on the row with its signed stamp.
Asking again costs as much as the labelling did and, for a deterministic teacher, returns the same answer.

``ReusedTeacher`` therefore answers from the stored rows, and sends the first ``live_items`` items to the teacher
again, live, through the gateway. Those live answers give the teacher's latency (reused answers carry none: their
``latency_s`` is NaN and the speed figures leave them out) and check the reuse: every live answer is compared with the
stored one, and a mismatch is counted and reported (``describe()["reuse"]``), never hidden. A stored row whose
answer was edited by a reviewer still reports the teacher's own answer (``teacher_label``), not the correction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distillgate.evals.sources import AnswerSource, Generation, Message


@dataclass(frozen=True)
class StoredAnswer:
    label: str
    label_probs: dict[str, float] | None
    row_id: str
    request_id: str | None  # the stamp's request id: the governed call the answer came from


def stored_answers(rows: Iterable[Mapping[str, Any]]) -> dict[str, StoredAnswer]:
    """The teacher's stored answer per input text, from dataset rows that have one (first sample of each input)."""
    out: dict[str, StoredAnswer] = {}
    for row in rows:
        label = row.get("teacher_label")
        if label in (None, "") or int(row.get("sample_index") or 0) != 0:
            continue
        text = str(row["input"])
        if text in out:
            continue
        probs = row.get("label_probs")
        stamp = row.get("stamp") or {}
        out[text] = StoredAnswer(str(label), {str(k): float(v) for k, v in probs.items()} if probs else None,
                                 str(row.get("row_id")), stamp.get("request_id") if isinstance(stamp, dict) else None)
    return out


@dataclass
class ReusedTeacher:
    """An ``AnswerSource`` that answers from stored teacher answers and re-asks the first ``live_items`` live."""

    live: AnswerSource
    stored: Mapping[str, StoredAnswer]
    live_items: int = 40
    name: str = ""
    asked_live: int = 0
    reused: int = 0
    missing: int = 0  # items with no stored answer: asked live
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.name or self.live.name

    def generate(self, messages: Sequence[Message], *, max_tokens: int) -> Generation:
        text = str(messages[-1].get("content", "")) if messages else ""
        found = self.stored.get(text)
        if found is None or self.asked_live < self.live_items:
            gen = self.live.generate(messages, max_tokens=max_tokens)
            if found is None:
                self.missing += 1
                return gen
            self.asked_live += 1
            if gen.error is None and gen.text.strip() != found.label:
                self.mismatches.append({"row_id": found.row_id, "stored": found.label, "live": gen.text.strip()})
            return gen
        self.reused += 1
        probs = found.label_probs or {}
        top = probs.get(found.label)
        mean_lp = math.log(top) if top else None
        meta: dict[str, Any] = {"reused_from": "generate", "row_id": found.row_id}
        if probs:
            meta["label_probs"] = probs
        if found.request_id:
            meta["stamp_request_id"] = found.request_id
        return Generation(found.label, float("nan"), 0, 0, mean_lp, meta)

    def describe(self) -> dict[str, Any]:
        card = dict(self.live.describe())
        card["reuse"] = self.summary()
        return card

    def summary(self) -> dict[str, Any]:
        checked = self.asked_live
        return {"reused": self.reused, "asked_live": checked, "missing": self.missing,
                "live_matches": checked - len(self.mismatches), "mismatches": self.mismatches[:20],
                "what": "teacher answers for the project's own rows come from the generate stage (same request, "
                        "stamped); the first items were asked again live for latency and to check the reuse"}

    def close(self) -> None:
        self.live.close()
