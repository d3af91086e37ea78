"""The C allocator's policy for processes that allocate the same big buffers every step.

A compute node assembles each layer's weights into a fresh tensor, runs it and drops it,
layer after layer, step after step; and it does so from several threads (gRPC's and its
compute thread), each with its own glibc arena. glibc serves a request above its mmap
threshold with a fresh mapping and trims freed memory at the top of a heap back to the
kernel, so every step faults in the same hundreds of megabytes of zeroed pages again:
measured on a 1-node gpt-10m run, about 50,000 minor page faults a second and kernel
time at 16% of the node's user time. A plain torch loop in one thread escapes most of
this through glibc's adaptive threshold, which per-thread arenas defeat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Requests up to this size come from the heap and are reused, bytes (glibc's maximum on
#: 64-bit: half its 64 MiB heap size).
KEEP_BELOW_BYTES = 32 << 20
#: Freed memory at a heap's top is kept up to this size instead of returned, bytes.
KEEP_FREE_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Have this process reuse freed buffers instead of mapping fresh pages for each one.

    Once per process; True where the C library took both settings (glibc), False
    elsewhere (another C library, or none found), where nothing changes.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES)
    )
