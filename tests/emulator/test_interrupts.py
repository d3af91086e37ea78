"""Ctrl-C / SIGTERM on a real ``wafer train`` process (issue 11, part 5).

The first signal stops at the next step boundary: checkpoint, partial report,
the command that resumes, exit 130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C
stops at once. Never a traceback.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shlex
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
import torch

from tests.emulator.test_cli import ENV

pytestmark = pytest.mark.integration

NUM_STEPS = 5000  # far more than a test waits for: the run only ends by the signal
# tqdm's progress line once at least one step is done, e.g. "train:   0%|  | 1/5000": stderr is
# a terminal, as where a user presses Ctrl-C (off a terminal the first plain progress line
# comes only after a tenth of the run or a 10 s heartbeat).
STEP_DONE = re.compile(rb"\b[1-9]\d*/" + str(NUM_STEPS).encode())


# As a user runs it: the console script starts the local Ray early (emulator.early_ray).
RUN_ENV = {k: v for k, v in ENV.items() if k != "WAFER_EARLY_RAY"}


def _start(tmp_path, *extra: str, terminal: bool = True) -> subprocess.Popen:
    """The run, its stderr a terminal (``process.terminal``, the reading end) or a pipe."""
    args = ["train", "--nodes", "1", "--batch-size", "16", "--steps", str(NUM_STEPS)]
    args += ["--json", str(tmp_path / "report.json"), *extra]
    if not terminal:
        # A session of its own, so that a signal to its process group reaches nothing else.
        process = subprocess.Popen(
            [sys.executable, "-m", "emulator.cli", *args],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        process.terminal = None
        return process
    reading, stderr = pty.openpty()
    # A terminal has a size: tqdm draws no bar on one 0 columns wide.
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    # A session of its own, so that a signal to its process group reaches nothing else (and
    # the terminal is its stderr, not its controlling terminal).
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "emulator.cli", *args],
            cwd=tmp_path,
            env=RUN_ENV,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    finally:
        os.close(stderr)
    process.terminal = reading
    return process


def _signal_after_first_step(
    process: subprocess.Popen, *signums: int, gap_s: float = 0.05, group: bool = True
) -> tuple[str, str]:
    stderr = bytearray()
    stepped = threading.Event()

    fd = process.terminal if process.terminal is not None else process.stderr.fileno()

    def read() -> None:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every process that had the terminal closed it
                break
            if not chunk:
                break
            stderr.extend(chunk)
            if STEP_DONE.search(stderr):
                stepped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not stepped.wait(timeout=240):
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"no step done in 240 s: {stderr.decode(errors='replace')}")
    for signum in signums:
        if group:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)
        time.sleep(gap_s)
    stdout = process.stdout.read()
    process.wait(timeout=120)
    reader.join(timeout=10)
    if process.terminal is not None:
        os.close(process.terminal)
    return stdout.decode(), stderr.decode(errors="replace")


# Ctrl-C in a terminal signals the whole process group (Ray's own processes block SIGINT);
# SIGTERM goes to the driver (`kill PID`): to the group, it would end Ray's processes too.
# With checkpoint.dir set, the stop's checkpoint goes there, beside the periodic ones.
@pytest.mark.parametrize(
    ("signum", "status", "group", "checkpoint_dir"),
    [(signal.SIGINT, 130, True, False), (signal.SIGTERM, 143, False, True)],
)
def test_signal_stops_at_the_step_boundary_with_checkpoint_and_report(
    tmp_path, signum, status, group, checkpoint_dir
):
    extra = ["--seed", "5"]
    if checkpoint_dir:
        (tmp_path / "run.yaml").write_text(f"checkpoint: {{dir: {tmp_path / 'ck'}}}\n")
        extra += ["--config", str(tmp_path / "run.yaml")]
    process = _start(tmp_path, *extra)
    out, err = _signal_after_first_step(process, signum, group=group)
    assert process.returncode == status, out + err
    assert "Traceback" not in out + err
    report = json.loads((tmp_path / "report.json").read_text())
    done = report["stopped"]["num_steps_done"]
    assert report["stopped"]["reason"] == signal.Signals(signum).name
    assert done == len(report["steps"]) >= 1 and report["final_loss"] is not None
    checkpoint = report["stopped"]["checkpoint"]
    if checkpoint_dir:
        assert checkpoint == str(tmp_path / "ck" / f"step-{done:08d}.pt")
    else:
        assert checkpoint == str(tmp_path / f"wafer-step{done}.ckpt")
    payload = torch.load(checkpoint, weights_only=True)
    assert [layer["version"] for layer in payload["store"]["layers"]] == [done] * 3
    # The printed command continues the same run for the steps that are left, and writes
    # its report beside this one's.
    command = shlex.split(out.split("resume with:")[1].strip().splitlines()[0])
    assert command[:2] == ["wafer", "train"] and "--seed" in command
    assert command[command.index("--steps") + 1] == str(NUM_STEPS - done)
    assert command[command.index("--resume") + 1] == checkpoint
    assert command[command.index("--json") + 1] == str(tmp_path / "report-resumed.json")


def test_second_ctrl_c_stops_at_once_without_traceback(tmp_path):
    # Off a terminal, mid-run: the two signals come 50 ms apart while steps are flowing.
    process = _start(tmp_path, terminal=False)
    out, err = _signal_after_first_step(process, signal.SIGINT, signal.SIGINT)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert "stopping now" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stopped"]["reason"] == "SIGINT"
    assert len(report["steps"]) == report["stopped"]["num_steps_done"] >= 1
    # Mostly the second signal cuts a step short (no checkpoint); if the first one reached the
    # boundary within the gap, its checkpoint is kept and the resume command printed.
    assert report["stopped"]["checkpoint"] is None or "resume with" in out
