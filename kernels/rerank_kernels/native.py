"""librerank_cpu.so, the C kernels of csrc/ (built by CMake into the package), loaded once with
ctypes. Its functions release the GIL while they run (ctypes) and share their work out over
torch's OpenMP threads (the library links libgomp.so.1 by soname: torch's copy, already loaded).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

LIBRARY = "librerank_cpu.so"


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why it is missing)."""
    import torch  # noqa: F401  (its libgomp.so.1 first, so that the library's soname resolves to it)

    import rerank_kernels

    found = [Path(d) / LIBRARY for d in rerank_kernels.__path__ if (Path(d) / LIBRARY).exists()]
    if not found:
        return None, f"{LIBRARY} was not built (no C compiler when the package was installed)"
    try:
        return ctypes.CDLL(str(found[0])), None
    except OSError as e:
        return None, f"{found[0]} does not load: {e}"
