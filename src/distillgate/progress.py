"""Progress for a console that is not a terminal (CI, nohup, a log file), where a live bar shows nothing.

Used by ``distillgate run`` and ``distillgate dataset generate`` for teacher generation; training has its own
step-and-loss lines (``train.loop.ProgressLines``) built on the same ``clock`` format.
"""

from __future__ import annotations

import time

from rich.console import Console


def clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress:
    """Progress for a console that is not a terminal (CI, nohup, a log file), where rich's bar shows nothing: a line
    at the start, then every ``every_s`` seconds and at the end — ``teacher generation: 40/120 answers (33%),
    812 tok/s, elapsed 0:30, eta 1:00``. Silent on a terminal (the bar is there)."""

    def __init__(self, what: str, unit: str, console: Console, every_s: float) -> None:
        self.what, self.unit, self.console, self.every_s = what, unit, console, every_s
        self.enabled = not console.is_terminal
        self.total = self.done = self.first = 0
        self.started = self.last = time.monotonic()

    def start(self, total: int, already: int) -> None:
        self.total, self.done, self.first = total, already, already
        self.started = self.last = time.monotonic()
        if self.enabled:
            self.console.print(f"{self.what}: {total - already} {self.unit} to ask for ({already} already stored)",
                               highlight=False, soft_wrap=True)

    def advance(self, n: int, rate: str) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every_s and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.started
        made = self.done - self.first
        eta = elapsed / made * (self.total - self.done) if made else 0.0
        share = 100 * self.done / max(self.total, 1)
        self.console.print(f"{self.what}: {self.done}/{self.total} {self.unit} ({share:.0f}%), {rate}, "
                           f"elapsed {clock(elapsed)}, eta {clock(eta)}", highlight=False, soft_wrap=True)
