"""What the embedder really sees of a templated prompt: its variable part, found by diffing it against the project's
approved templates (``extraction.approved.<project>[].templates``).

A labelling template that lists 77 intents is ~580 wordpieces; all-MiniLM-L6-v2 reads 256, so a prompt embedded
whole is seen as its template's head and anything injected after it is invisible (cosine 1.0 with approved
traffic). ``split`` returns the prompt's *pieces* instead: the text filling the template's ``{input}`` slots and
every run of words inserted into, or replacing, the template's own text. A prompt that fits no template is cut into
consecutive chunks of at most ``CHUNK_WORDS`` words, so nothing is ever cut off either.

Matching: a fast path (the template's literal parts appear in order, the first at the start and the last at the
end); else a word-level diff (``difflib.SequenceMatcher`` without its "junk" heuristic) against each template, kept
when at least ``MIN_MATCHED`` of the template's words are found in order in the prompt.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from distillgate.extraction.features import frozen
from distillgate.policy.approved import SLOT, template_hash

CHUNK_WORDS = 128  # all-MiniLM-L6-v2 reads 256 wordpieces: 128 words leave room for long words
MIN_MATCHED = 0.8
MAX_PIECES = 16  # pieces embedded per request; more are recorded as unobserved (see Split.unseen)
_SPLIT_WS = re.compile(r"\S+")


@dataclass(frozen=True)
class Split:
    """A prompt as the content signals see it: ``template`` (id) and ``template_hash`` when it fits one, and its
    ``pieces`` (what is embedded; ``unseen`` more pieces were not)."""

    template: str | None
    template_hash: str | None
    pieces: tuple[str, ...]
    unseen: int = 0

    @property
    def variable(self) -> str:
        """The variable text (the pieces joined): what the word-level detectors read."""
        return "\n".join(self.pieces)


def chunks(text: str, size: int = CHUNK_WORDS) -> list[str]:
    toks = _SPLIT_WS.findall(text)
    return [" ".join(toks[i:i + size]) for i in range(0, len(toks), size)] or [""]


def _bounded(pieces: list[str], template: str | None, thash: str | None) -> Split:
    out: list[str] = []
    for piece in pieces:
        # a piece of n words has at least 2n - 1 characters: one this short cannot have more than CHUNK_WORDS
        long = len(piece) > 2 * CHUNK_WORDS and len(_SPLIT_WS.findall(piece)) > CHUNK_WORDS
        out.extend(chunks(piece) if long else [piece])
    out = [p for p in out if p.strip()] or [""]
    return frozen(Split, {"template": template, "template_hash": thash, "pieces": tuple(out[:MAX_PIECES]),
                          "unseen": max(0, len(out) - MAX_PIECES)})


@dataclass(frozen=True)
class _Template:
    tid: str
    text: str
    literals: tuple[str, ...]  # the text around the slots: len = slots + 1
    words: tuple[str, ...]  # the template's words, slots removed
    thash: str

    def fast(self, prompt: str) -> list[str] | None:
        """The slot fills when the prompt is the template with its slots filled (literal parts unchanged)."""
        first, *middle, last = self.literals
        if not prompt.startswith(first) or not prompt.endswith(last) or len(prompt) < len(first) + len(last):
            return None
        pos, fills = len(first), []
        end = len(prompt) - len(last)
        for lit in middle:
            at = prompt.find(lit, pos, end) if lit else pos
            if at < 0:
                return None
            fills.append(prompt[pos:at])
            pos = at + len(lit)
        fills.append(prompt[pos:end])
        return fills


class TemplateSet:
    """The approved templates of one project."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        self._templates = [
            _Template(tid, text, tuple(text.split(SLOT)), tuple(_SPLIT_WS.findall(text.replace(SLOT, " "))),
                      template_hash(text))
            for tid, text in sorted(templates.items())]

    def __bool__(self) -> bool:
        return bool(self._templates)

    def split(self, prompt: str) -> Split:
        if not self._templates:  # most projects declare none: the whole prompt is the variable part
            return _bounded([prompt], None, None)
        for t in self._templates:
            fills = t.fast(prompt)
            if fills is not None:
                return _bounded(fills, t.tid, t.thash)
        toks = _SPLIT_WS.findall(prompt)
        best: tuple[float, _Template, list[str]] | None = None
        for t in self._templates:
            matched, pieces = _diff(t.words, toks)
            share = matched / max(1, len(t.words))
            if share >= MIN_MATCHED and (best is None or share > best[0]):
                best = (share, t, pieces)
        if best is not None:
            return _bounded(best[2], best[1].tid, best[1].thash)
        return _bounded([prompt], None, None)


def _diff(template: tuple[str, ...], prompt: list[str]) -> tuple[int, list[str]]:
    """Words of ``template`` found in order in ``prompt``, and the runs of prompt words outside those matches."""
    sm = difflib.SequenceMatcher(None, template, prompt, autojunk=False)
    matched = 0
    pieces: list[str] = []
    pos = 0
    for block in sm.get_matching_blocks():
        if block.b > pos:
            pieces.append(" ".join(prompt[pos:block.b]))
        pos = block.b + block.size
        matched += block.size
    return matched, pieces


NO_TEMPLATES = TemplateSet({})


def template_sets(approved: Mapping[str, Iterable[Mapping[str, str]]]) -> dict[str, TemplateSet]:
    """project -> its TemplateSet from {project: [templates of each shape]}."""
    out: dict[str, TemplateSet] = {}
    for project, groups in approved.items():
        merged: dict[str, str] = {}
        for g in groups:
            merged.update(g)
        out[project] = TemplateSet(merged)
    return out
