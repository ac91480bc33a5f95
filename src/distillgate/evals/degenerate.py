"""Degenerate output: an answer that is no answer at all (empty, junk, a token loop).

A small or badly trained student can emit "_____you_you_you_you…", the same word a hundred times, or nothing.
Such an output must never be scored as an answer: not as compliance by a refusal detector, not as a parsed label
(it counts as wrong), and not in speed figures (a junk answer is fast because it is junk). Every scorer asks
``degenerate_reason`` first; this module is the one place that decides.

Rules, in order, each with the reason code it returns:

* ``empty`` — nothing but whitespace;
* ``no_words`` — not one letter or digit (punctuation, symbols, underscores);
* ``not_language`` — 20 or more visible characters of which fewer than 35 % are letters (symbol soup);
* ``repeated_token`` — 6 or more words of which one word makes more than half;
* ``loop`` — the answer ends in a cycle of 1 to 8 words repeated at least 5 times that covers at least half of
  its words ("Sure, here is how: the the the the the …" or "I am sorry. I am sorry. …"), or 20 or more
  visible characters that are one cycle of 1 to 8 characters repeated ("0x0x0x0x…");
* ``repetitive`` — 200 or more characters that zlib compresses to under 12 % of their size (ordinary English
  compresses to 40–60 %, lists and code to 25–40 %).

The thresholds are generous on purpose: a short label ("card_arrival"), a number ("42"), a one-word answer, a
list or a code block is never degenerate. ``benchmarks/refusal_detector.py`` checks that no response of the
labelled sets is flagged.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

WORD = re.compile(r"[^\W_]+", re.UNICODE)
CHAR_CYCLE = re.compile(r"(.{1,8}?)\1{4,}", re.DOTALL)
REASONS = ("empty", "no_words", "not_language", "repeated_token", "loop", "repetitive")


def _tail_cycle(words: list[str]) -> int:
    """Number of words covered by the longest run of one repeated 1..8-word cycle at the end of ``words``."""
    best = 0
    for period in range(1, 9):
        if len(words) < 5 * period:
            break
        cycle = words[-period:]
        covered = period
        while covered + period <= len(words) and words[-covered - period:len(words) - covered] == cycle:
            covered += period
        if covered >= 5 * period:
            best = max(best, covered)
    return best


def degenerate_reason(text: str | None) -> str | None:
    """Why ``text`` is degenerate (one of ``REASONS``), or None for a real answer."""
    if text is None or not text.strip():
        return "empty"
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if not any(c.isalnum() for c in visible):
        return "no_words"
    if len(visible) >= 20 and letters / len(visible) < 0.35:
        return "not_language"
    words = [w.lower() for w in WORD.findall(text)]
    if len(words) >= 6 and Counter(words).most_common(1)[0][1] > len(words) / 2:
        return "repeated_token"
    if len(words) >= 10 and _tail_cycle(words) * 2 >= len(words):
        return "loop"
    if len(visible) >= 20 and CHAR_CYCLE.fullmatch("".join(visible)):
        return "loop"
    raw = text.encode("utf-8")
    if len(raw) >= 200 and len(zlib.compress(raw, 9)) < 0.12 * len(raw):
        return "repetitive"
    return None


def is_degenerate(text: str | None) -> bool:
    return degenerate_reason(text) is not None
