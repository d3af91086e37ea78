"""Training progress on stderr: a live bar on a terminal, a few plain lines anywhere else.

A tqdm bar redraws itself with carriage returns, which is right on a terminal
but floods a CI log or a ``| tee`` file with hundreds of partial lines. Off a
terminal the same progress is a plain line at every tenth of the run, and at
least every ``heartbeat_s`` seconds so that a slow run still shows it is alive.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm

#: Plain lines mark each tenth of the run.
PLAIN_FRACTION = 0.1
#: ... and at most this long apart, s.
HEARTBEAT_S = 10.0


class StepProgress:
    """Iterate over ``steps``; ``set_loss`` after each step shows the latest loss."""

    def __init__(
        self,
        steps: range,
        *,
        enabled: bool = True,
        desc: str = "train",
        stream: TextIO | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        clock=time.monotonic,
    ):
        self.steps = steps
        self.enabled = enabled
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.heartbeat_s = heartbeat_s
        self._clock = clock
        isatty = getattr(self.stream, "isatty", None)
        self.live = enabled and callable(isatty) and isatty()
        self._bar = None
        if self.live:
            self._bar = tqdm(steps, desc=desc, unit="step", leave=False, file=self.stream)
        self._loss: float | None = None
        self._done = 0
        self._marks_printed = 0  # tenths of the run already announced
        self._started = self._last_line = clock()

    def __iter__(self) -> Iterator[int]:
        if self._bar is not None:
            yield from self._bar
            return
        for step in self.steps:
            yield step
            self._done += 1
            self._maybe_print()

    def advance(self, num_steps: int = 1) -> None:
        """For a caller that does not iterate: ``num_steps`` more steps done (negative: steps
        that will run again, after MemoryX came back from an earlier checkpoint)."""
        if self._bar is not None:
            self._bar.update(num_steps)
            return
        self._done += num_steps
        if num_steps > 0:
            self._maybe_print()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def set_loss(self, loss: float) -> None:
        self._loss = loss
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}")

    def _maybe_print(self) -> None:
        if not self.enabled:
            return
        total = len(self.steps)
        mark = int(self._done / total / PLAIN_FRACTION + 1e-9)
        now = self._clock()
        if mark > self._marks_printed or now - self._last_line >= self.heartbeat_s:
            self._marks_printed = max(mark, self._marks_printed)
            self._last_line = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        total = len(self.steps)
        elapsed = now - self._started
        parts = [f"{self.desc}: step {self._done}/{total} ({100 * self._done / total:.0f}%)"]
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        parts.append(f"{elapsed:.1f} s elapsed")
        return ", ".join(parts)
