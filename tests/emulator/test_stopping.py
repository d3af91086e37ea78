"""Signal handling of a run, without a run: the flag, the second signal, and the report phase."""

from __future__ import annotations

import os
import shlex
import signal

import pytest

from emulator.stopping import StopSignals, resume_command


def test_first_signal_asks_for_the_step_boundary_and_the_second_interrupts():
    stop = StopSignals()
    stop._handle(signal.SIGTERM, None)
    assert stop.requested and stop.name == "SIGTERM" and stop.exit_status == 143
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_after_the_steps_a_second_signal_no_longer_interrupts_the_report(capfd):
    stop = StopSignals()
    stop._handle(signal.SIGINT, None)
    stop.finishing()
    stop._handle(signal.SIGINT, None)  # must not raise: the report is being written
    assert stop.exit_status == 130
    assert "writing the report" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["train", "--steps", "100", "--json", "out/run.json", "--seed", "3"],
            ["train", "--seed", "3", "--json", "out/run-resumed.json"],
        ),
        (
            ["train", "--steps=100", "--json=run", "--resume", "old.ckpt"],
            ["train", "--json", "run-resumed"],
        ),
        (["train", "--model", "gpt-tiny"], ["train", "--model", "gpt-tiny"]),
    ],
)
def test_resume_command_continues_the_run_and_keeps_the_stopped_report(argv, expected):
    command = shlex.split(resume_command(argv, "ck/step-00000007.pt", 93))
    assert command[0] == "wafer"
    assert command[1:-4] == expected
    assert command[-4:] == ["--steps", "93", "--resume", os.path.abspath("ck/step-00000007.pt")]
