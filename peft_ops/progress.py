"""A one-line progress report on stderr for a set-up that takes a while (LoRA-XS's SVDs of a large
model's weights: minutes on a CPU). Silent for the first :data:`DELAY_SECONDS`, so a fast set-up prints
nothing; then the line is rewritten in place after each step, and ended with a newline."""
from __future__ import annotations

import sys
import time

__all__ = ["DELAY_SECONDS", "clock", "Progress"]

DELAY_SECONDS = 2.0
clock = time.monotonic  # read at each step, so a test can replace it with a fake clock


class Progress:
    """``with Progress("inject", total) as progress: ... progress.step()`` once per finished step."""

    def __init__(self, label: str, total: int, *, enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled
        self.done, self.shown, self.start = 0, False, clock()

    def __enter__(self) -> "Progress":
        return self

    def step(self) -> None:
        self.done += 1
        elapsed = clock() - self.start
        if self.enabled and elapsed >= DELAY_SECONDS:
            # sys.stderr looked up at each write: it may be replaced (pytest's capture, a notebook)
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} layers set up ({elapsed:.0f} s)")
            sys.stderr.flush()
            self.shown = True

    def __exit__(self, *exc) -> None:
        if self.shown:  # end the line, also when the set-up failed part-way
            sys.stderr.write("\n")
            sys.stderr.flush()
