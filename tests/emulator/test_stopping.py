"""Signal handling of a run, without a run: the flag, the second signal, and the report phase."""

from __future__ import annotations

import signal

import pytest

from emulator.stopping import StopSignals


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
