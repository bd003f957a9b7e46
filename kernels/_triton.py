"""Optional Triton import shared by the kernel files.

The CPU install has no Triton: the kernel files must still import (they hold the PyTorch
references the CPU path runs), so without Triton ``triton.jit`` is the identity and
``tl.constexpr`` a placeholder, and a launcher called anyway raises a clear error.
"""
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=None)


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("this op is a Triton kernel and the 'triton' package is not installed "
                           "(pip install triton, or use the PyTorch reference ops)")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
