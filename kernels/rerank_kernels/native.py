"""librerank_cpu.so, the C kernels of csrc/ (built by CMake into the package), loaded once with
ctypes, and the thread split they share.

Each C function works on a range of independent items (rows, or (sequence, head) pairs) and
releases the GIL while it runs (ctypes), so ``split`` runs slices of the range on a small
thread pool, one slice on the calling thread. The slices only decide which thread computes an
item, never how: an item's bytes are the same whatever the split.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

LIBRARY = "librerank_cpu.so"


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why it is missing)."""
    import rerank_kernels

    found = [Path(d) / LIBRARY for d in rerank_kernels.__path__ if (Path(d) / LIBRARY).exists()]
    if not found:
        return None, f"{LIBRARY} was not built (no C compiler when the package was installed)"
    try:
        return ctypes.CDLL(str(found[0])), None
    except OSError as e:
        return None, f"{found[0]} does not load: {e}"


_pool: ThreadPoolExecutor | None = None


def split(count: int, call: Callable[[int, int], None], min_per_thread: int = 1,
          cost: Sequence[float] | None = None) -> None:
    """call(begin, end) over [0, count) in up to torch.get_num_threads() contiguous slices of
    about equal ``cost`` (cumulative cost per item, ascending; default: items cost the same),
    at least ``min_per_thread`` items each."""
    global _pool
    threads = max(1, min(torch.get_num_threads(), count // max(min_per_thread, 1)))
    if threads == 1:
        call(0, count)
        return
    if _pool is None or _pool._max_workers < threads - 1:
        _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="rerank-native")
    if cost is None:
        bounds = [count * i // threads for i in range(threads + 1)]
    else:
        total = cost[-1]
        bounds = [0, *(bisect.bisect_left(cost, total * i / threads) for i in range(1, threads)), count]
    futures = [_pool.submit(call, bounds[i], bounds[i + 1]) for i in range(1, threads) if bounds[i] < bounds[i + 1]]
    if bounds[0] < bounds[1]:
        call(bounds[0], bounds[1])
    for f in futures:
        f.result()
