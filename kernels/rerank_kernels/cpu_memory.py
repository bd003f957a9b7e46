"""Freed memory kept for reuse on the CPU (glibc malloc), as onnxruntime's arena keeps it.

A forward allocates tens of large tensors (an FFN activation of 4,096 rows is 64 MB), each freed
a few milliseconds later. glibc serves allocations above its mmap threshold (at most 32 MB) with
fresh mmap()s and returns them at free(): every such tensor then costs a page fault per 4 KB page
the first time it is written, measured at ~12% of an int8 forward and ~8% of each of its
multiplies (benchmarks.profile_forward). With mmap off and trimming off, freed blocks stay in the
heap and the next forward's tensors reuse them: the resident size settles at the forward's peak
and stays there, which a server sized for that peak can afford.

Set through ``mallopt`` once per process, after the model is loaded (``Engine.load`` on the CPU):
set before, the packing of the weights, which frees each plain weight as its packed copy is
made, would leave the heap fragmented (peak RSS 1.47x the weights instead of <= 1.3x). A
variable the user set (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, glibc's own names) or
``RERANK_KEEP_FREED_MEMORY=0`` leaves glibc as it is. Other C libraries: nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # an int: mallopt takes one

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Turns off glibc's mmap for large blocks and its heap trimming, once; True when set
    (now or earlier), False when left alone (not glibc, or the user's environment decides)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("RERANK_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(v in os.environ for v in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; glibc documents no failure for these two
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        log.warning("mallopt refused to keep freed memory: large tensors are mapped afresh at each forward")
        return False
    _applied = True
    log.info("glibc malloc keeps freed memory for reuse (mmap and trimming off; "
             "RERANK_KEEP_FREED_MEMORY=0 leaves them on)")
    return True
