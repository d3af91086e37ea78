"""core.allocator: a process that reuses freed buffers faults far fewer fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A child process per setting: the policy is per process and cannot be undone.
_CHILD = """
import resource, sys, threading
import torch
from core.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # once per process; a second call changes nothing

def receive(out):  # as a gRPC thread assembles a layer's tensors
    out.extend(torch.ones(1 << 20) for _ in range(8))  # 8 x 4 MiB

def step():
    out = []
    thread = threading.Thread(target=receive, args=(out,))
    thread.start()
    thread.join()
    sum(t.sum() for t in out)  # the compute thread uses them
    out.clear()  # and drops them: 32 MiB free at the top of the heap

for _ in range(3):  # warm-up: the first buffers fault in either way
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    # 20 steps of 32 MiB: about 160,000 fresh 4 KiB pages when each step's are new.
    default, kept = _faults("default"), _faults("keep")
    assert default > 80_000 and kept < default / 5, (kept, default)
