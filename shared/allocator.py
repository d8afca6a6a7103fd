"""Keep freed memory in the process for reuse (glibc), instead of handing it back to the OS.

A DP step builds per-user gradients of the adapter, [B, out, in] floats: 50 MB
for the default adapter at 64 users, several such tensors per step. glibc serves
a block above its mmap threshold (32 MiB at most, by default) with fresh pages
from the OS and unmaps it when it is freed, so every step page-faults all of that
memory in again. Measured on 2 cores: zeroing a fresh [64, 512, 384] tensor took
12 ms, 1.2 ms on reused memory; the Scientific DP step fell from 126 ms to 96 ms
and the same step without DP from 75 ms to 67 ms. The cost: the process keeps
its peak heap instead of shrinking after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_LIMIT = 1 << 30  # blocks up to 1 GiB come from the heap and stay there when freed


@functools.cache
def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds to 1 GiB once per process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: keep their defaults
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))
