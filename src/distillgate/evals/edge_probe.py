"""The edge-case probe: deterministic edge-case transforms of held-out items, scored as a slice of their own.

Synthetic training rows never enter val, test or golden (``distillgate.data.synthetic``), so "accuracy on
synthetic data" cannot be read off the test split. What can be measured honestly is how the models hold up on the
kind of input the synthetic edge cases imitate: each evaluated item (a real test or golden row) is rewritten by the
same deterministic transforms ``dataset synthesize`` uses (``data.synthesize.transform_text``: misspelt, mixed
language, odd formatting, very short), keeps its own gold label (the row's reference label; without one, the
teacher's stored label, and the probe then measures consistency with it), and both models answer it. The probe
items are made at evaluation time and stored only with the evaluation's answers: they are never dataset rows, so
no training split can hold one; a probe text equal to a training row's input is dropped (and counted) so a probe
item can never be something the student was trained on.

Item ids are ``<item id>~<transform>``; the random choices of a transform are seeded by the transform and the item
id, so the same item always becomes the same probe text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from distillgate.data.synthesize import transform_text
from distillgate.errors import UserError
from distillgate.evals.suites import Item, Suite, _sample, length_bucket, normalise

#: the transforms the probe uses by default: those whose gold label the transform keeps (``empty`` has no
#: meaning, ``long`` joins other messages of the gold label, which only the training side knows)
PROBE_TRANSFORMS: tuple[str, ...] = ("misspelt", "mixed_language", "formatting", "short")
ALLOWED = frozenset(PROBE_TRANSFORMS)


def probe_text(transform: str, item_id: str, text: str) -> str:
    """``text`` under ``transform``, seeded by the transform and the item id (the same text every time)."""
    return transform_text(transform, text, random.Random(f"edge:{transform}:{item_id}"))


def probe_items(items: Sequence[Item], transforms: Sequence[str] = PROBE_TRANSFORMS, *,
                exclude_texts: Iterable[str] = (), fallback_gold: Mapping[str, str] | None = None,
                ) -> tuple[list[Item], dict[str, int]]:
    """One probe item per (item, transform), and counts of what was left out and why.

    ``exclude_texts``: training inputs; a probe text equal to one (after ``normalise``) is dropped.
    ``fallback_gold``: item id -> label for items without a gold label (the teacher's stored label).
    An item with neither, a transform that leaves the text unchanged or empty, is left out too.
    """
    unknown = sorted(set(transforms) - ALLOWED)
    if unknown:
        raise UserError(f"edge-probe transform(s) {unknown} cannot keep the item's label",
                        hint=f"use {', '.join(PROBE_TRANSFORMS)}")
    banned = {normalise(t) for t in exclude_texts}
    fallback = dict(fallback_gold or {})
    out: list[Item] = []
    dropped = {"no_label": 0, "unchanged_or_empty": 0, "equals_a_training_input": 0}
    for item in items:
        gold = item.gold if item.gold is not None else fallback.get(item.item_id)
        for name in transforms:
            if gold is None:
                dropped["no_label"] += 1
                continue
            text = probe_text(name, item.item_id, item.text)
            if not text.strip() or normalise(text) == normalise(item.text):
                dropped["unchanged_or_empty"] += 1
                continue
            if normalise(text) in banned:
                dropped["equals_a_training_input"] += 1
                continue
            slices = {"transform": name, "source length": length_bucket(item.text),
                      "gold": "reference label" if item.gold is not None else "teacher's stored label"}
            out.append(Item(f"{item.item_id}~{name}", text, gold, slices))
    return out, dropped


def probe_suite(suite: Suite, transforms: Sequence[str] = PROBE_TRANSFORMS, *, sample: int | None = None,
                seed: int = 0, exclude_texts: Iterable[str] = (),
                fallback_gold: Mapping[str, str] | None = None) -> Suite:
    """The probe of a classification ``suite``: ``sample`` of its items (all when None), each under every
    transform; same labels and prompts, name ``<suite>-edge-probe``; ``meta`` says what was dropped."""
    if suite.kind != "classification":
        raise UserError("the edge-case probe needs a classification suite", hint="probe the project's own suite")
    source = _sample(list(suite.items), sample, seed)
    items, dropped = probe_items(source, transforms, exclude_texts=exclude_texts, fallback_gold=fallback_gold)
    if not items:
        raise UserError("the edge-case probe has no item left", hint=f"dropped: {dropped}")
    return replace(suite, name=f"{suite.name}-edge-probe", items=items,
                   meta={"probe_of": suite.name, "source_items": len(source), "transforms": list(transforms),
                         "dropped": dropped, "sample": sample, "seed": seed})
