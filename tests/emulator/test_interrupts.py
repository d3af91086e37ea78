"""Ctrl-C / SIGTERM on a real ``wafer train`` process (issue 11, part 5).

The first signal stops at the next step boundary: checkpoint, partial report,
the command that resumes, exit 130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C
stops at once. Never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.emulator.test_cli import ENV

pytestmark = pytest.mark.integration

NUM_STEPS = 5000  # far more than a test waits for: the run only ends by the signal
# tqdm's progress line once at least one step is done, e.g. "train:   0%|  | 1/5000".
STEP_DONE = re.compile(rb"\b[1-9]\d*/" + str(NUM_STEPS).encode())


def _start(tmp_path, *extra: str) -> subprocess.Popen:
    args = ["train", "--nodes", "1", "--batch-size", "16", "--steps", str(NUM_STEPS)]
    args += ["--json", str(tmp_path / "report.json"), *extra]
    # A session of its own, so that a signal to its process group reaches nothing else.
    return subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", *args],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _signal_after_first_step(
    process: subprocess.Popen, *signums: int, gap_s: float = 0.05, group: bool = True
) -> tuple[str, str]:
    stderr = bytearray()
    stepped = threading.Event()

    def read() -> None:
        while chunk := os.read(process.stderr.fileno(), 4096):
            stderr.extend(chunk)
            if STEP_DONE.search(stderr):
                stepped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert stepped.wait(timeout=240), stderr.decode(errors="replace")
    for signum in signums:
        if group:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)
        time.sleep(gap_s)
    stdout = process.stdout.read()
    process.wait(timeout=120)
    reader.join(timeout=10)
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
    process = _start(tmp_path)
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
