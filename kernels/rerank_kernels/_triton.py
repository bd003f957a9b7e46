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


# CUDA's launch limits on grid dimensions x, y, z (x up to 2**31 - 1, y and z up to 65,535).
CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def cuda_grid(*dims: int) -> tuple[int, ...]:
    """A launch grid, checked against ``CUDA_GRID_LIMITS``: a batch too large for it fails
    here with a clear message rather than with a CUDA launch error."""
    # not strict: a grid names one to three dimensions (a fourth would go unchecked: Triton refuses it)
    for axis, (n, limit) in enumerate(zip(dims, CUDA_GRID_LIMITS, strict=False)):
        if not 1 <= n <= limit:
            raise ValueError(f"grid dimension {'xyz'[axis]} = {n} is outside CUDA's 1..{limit} "
                             f"(grid {dims}): split the batch")
    return tuple(dims)
