"""Ending a run early without losing it: signals, and the exception that carries the partial report.

SIGINT (Ctrl-C) or SIGTERM asks the run to stop at the next step boundary, so
that MemoryX holds a committed step that a checkpoint can save; a second
signal stops at once (mid-step, so without a checkpoint). Either way ``train``
raises ``RunStopped`` with the report of the steps done.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from types import FrameType
from typing import Any

#: Exit status of a run stopped by each signal (the shell's 128 + signal number).
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: Exit status of a run that stopped on an error it could not continue past (NaN/Inf update).
ERROR_EXIT_STATUS = 1


class StopSignals:
    """SIGINT and SIGTERM handlers that set a flag the step loop checks between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        #: False once the steps are over: a second signal then no longer cuts the report short.
        self.armed = True
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.signum, 130) if self.signum is not None else 130

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "SIGINT"

    def install(self) -> None:
        """Take SIGINT and SIGTERM (again: ``ray.init`` sets its own SIGTERM handler)."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in EXIT_STATUS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def finishing(self) -> None:
        """The steps are over; what is left (stopping the actors, the report) runs to the end.

        A signal's handler runs when the main thread is back in Python, which can be
        after a blocking call it arrived during: a KeyboardInterrupt raised then would
        lose the report of the steps done.
        """
        self.armed = False

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # os.write, not print: the interrupted code may be inside a print to stderr itself.
        if self.signum is not None:
            if not self.armed:
                os.write(2, b"\nwafer: second signal: stopping now, writing the report\n")
                return
            os.write(2, b"\nwafer: second signal: stopping now, mid-step (no checkpoint)\n")
            raise KeyboardInterrupt
        self.signum = signum
        os.write(
            2,
            f"\nwafer: {signal.Signals(signum).name} received: stopping after the current step "
            "(press Ctrl-C again to stop at once)\n".encode(),
        )


class RunStopped(Exception):
    """The run ended before its last step; ``report`` holds the steps done.

    ``checkpoint`` is the MemoryX checkpoint written at the stop (None when
    none could be), and ``steps_left`` the steps a resumed run still has to do.
    """

    def __init__(
        self,
        message: str,
        *,
        report: Any,
        exit_status: int,
        checkpoint: str | None = None,
        steps_left: int = 0,
    ) -> None:
        super().__init__(message)
        self.report = report
        self.exit_status = exit_status
        self.checkpoint = checkpoint
        self.steps_left = steps_left


def resume_command(argv: list[str], checkpoint: str, steps_left: int) -> str:
    """``wafer`` + ``argv`` with ``--steps`` and ``--resume`` set to continue from ``checkpoint``.

    A ``--json PATH`` becomes ``--json PATH-resumed`` (``run.json`` -> ``run-resumed.json``):
    the stopped run's partial report stays where it is.
    """
    replaced = {"--steps", "--resume", "--json"}
    kept: list[str] = []
    json_path: str | None = None
    value_of: str | None = None
    for arg in argv:
        if value_of is not None:
            if value_of == "--json":
                json_path = arg
            value_of = None
            continue
        if arg in replaced:
            value_of = arg
            continue
        flag, _, value = arg.partition("=")
        if flag in replaced:
            if flag == "--json":
                json_path = value
            continue
        kept.append(arg)
    if json_path:
        stem, suffix = os.path.splitext(json_path)
        kept += ["--json", f"{stem}-resumed{suffix}"]
    return shlex.join(
        ["wafer", *kept, "--steps", str(steps_left), "--resume", os.path.abspath(checkpoint)]
    )


__all__ = ["EXIT_STATUS", "RunStopped", "StopSignals", "resume_command"]
