"""Progress off a terminal: a plain line about every tenth of the run, never a '\\r' redraw."""

from __future__ import annotations

import io

from emulator.progress import StepProgress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(num_steps: int, step_s: float, **kwargs) -> list[str]:
    stream, clock = io.StringIO(), _Clock()
    progress = StepProgress(range(5, 5 + num_steps), stream=stream, clock=clock, **kwargs)
    for step in progress:
        clock.now += step_s
        progress.set_loss(1.0 / (step + 1))
    text = stream.getvalue()
    assert "\r" not in text
    return text.splitlines()


def test_a_piped_run_prints_a_line_at_every_tenth():
    lines = _run(300, step_s=0.01)
    assert len(lines) == 10
    assert lines[0] == "train: step 30/300 (10%), loss 0.0286, 0.3 s elapsed"
    assert lines[-1].startswith("train: step 300/300 (100%), loss 0.0033")


def test_short_runs_print_each_step_once_at_most():
    assert [line.split(",")[0] for line in _run(3, step_s=0.01)] == [
        "train: step 1/3 (33%)",
        "train: step 2/3 (67%)",
        "train: step 3/3 (100%)",
    ]


def test_a_slow_run_prints_a_heartbeat_between_tenths():
    lines = _run(100, step_s=4.0, heartbeat_s=10.0)
    # A tenth takes 40 s: a heartbeat line every 3 steps (12 s) in between.
    assert 30 <= len(lines) <= 40
    assert lines[0].startswith("train: step 3/100 (3%)")


def test_disabled_progress_prints_nothing():
    assert _run(50, step_s=1.0, enabled=False) == []


def test_a_terminal_gets_the_live_bar():
    stream = _Terminal()
    progress = StepProgress(range(20), stream=stream)
    for _ in progress:
        progress.set_loss(0.5)
    assert progress.live and "\r" in stream.getvalue()
