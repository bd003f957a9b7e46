"""The int8 GEMMs' row-wise glue in C (csrc/int8_rows.c, built into librerank_cpu.so), through ctypes.

``quantize_rows`` and ``epilogue`` do in one pass over each row what the torch versions in
rerank_kernels.linear_int8 do in three to eight passes over the whole tensor (the FFN's (rows,
intermediate) activation is 64 MB at 4,096 rows: each pass costs milliseconds). ``epilogue``
can also quantize each finished row for the next GEMM while it is in the cache, so the FFN's
GELU output is never written in float32 (``QuantizedRows``).

The C code splits the rows over torch's own OpenMP threads (ctypes releases the GIL while it
runs); each row is computed alone with the same instructions whatever the split, so the bytes of
a row never depend on its batch. ``missing()`` says why the library cannot be used (not built, a CPU without
AVX-512, or RERANK_INT8_GLUE=torch); callers then use the torch versions.
"""
from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

import torch

from rerank_kernels import native

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


class QuantizedRows(NamedTuple):
    """Activations already quantized per row for an int8 GEMM: q (rows, cols) int8, or uint8
    holding q + 128 (``offset``), and scale (rows,) float32 with x ~= q * scale[:, None]."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: bool


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("RERANK_INT8_GLUE", "native") == "torch":
        return None, "RERANK_INT8_GLUE=torch"
    lib, why = native.library()
    if lib is None:
        return None, why
    if not lib.rk_cpu_supported():
        return None, "this CPU lacks AVX-512 (F, BW, DQ, VL), which the C glue is written in"
    lib.rk_quantize_rows.argtypes = (_ptr, _i64, _i64, _i64, _ptr, _ptr, _int)
    lib.rk_quantize_rows.restype = None
    lib.rk_epilogue.argtypes = (_ptr, _int, _i64, _i64, _ptr, _ptr, _ptr, _int, _ptr, _ptr, _ptr, _int)
    lib.rk_epilogue.restype = _int
    lib.rk_epilogue_layernorm.argtypes = (_ptr, _int, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr,
                                          ctypes.c_float, _ptr, _ptr, _ptr, _int)
    lib.rk_epilogue_layernorm.restype = _int
    lib.rk_gelu.argtypes = (_ptr, _i64, _ptr)
    lib.rk_gelu.restype = None
    return lib, None


_lib, _missing = _load()


def missing() -> str | None:
    """None when the C glue runs here, else why not."""
    return _missing


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def quantize_rows(x: torch.Tensor, offset: bool = False) -> QuantizedRows:
    """x (rows, cols) float32 with unit stride along cols -> QuantizedRows: per row, scale =
    absolute maximum / 127 (the smallest normal float for an all-zero row), q = round(x / scale)
    with ties to even (the torch version's values and scales, bit for bit)."""
    assert x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1, (x.dtype, x.shape, x.stride())
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.uint8 if offset else torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    _lib.rk_quantize_rows(x.data_ptr(), x.stride(0), cols, rows, q.data_ptr(), scale.data_ptr(), int(offset))
    return QuantizedRows(q, scale, offset)


def epilogue(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor | None,
             bias: torch.Tensor | None, gelu: bool, quantize: bool | None = None) -> torch.Tensor | QuantizedRows:
    """acc (rows, cols) int32 sums, or float32 with ``col_scale`` already applied (then None),
    contiguous -> act((acc * col_scale) * row_scale[:, None] + bias), act = exact GELU or none.
    float32 (rows, cols), written over ``acc`` when it is float32; or with ``quantize`` (False:
    int8, True: uint8 + 128) the rows quantized for the next GEMM (QuantizedRows)."""
    assert acc.is_contiguous() and acc.dtype in (torch.int32, torch.float32), (acc.dtype, acc.stride())
    rows, cols = acc.shape
    is_int32 = acc.dtype == torch.int32
    if quantize is None:
        out = torch.empty(rows, cols, dtype=torch.float32) if is_int32 else acc
        q = scale = None
    else:
        out = None
        q = torch.empty(rows, cols, dtype=torch.uint8 if quantize else torch.int8)
        scale = torch.empty(rows, dtype=torch.float32)
    row_scale, col_scale = row_scale.contiguous(), None if col_scale is None else col_scale.contiguous()

    if _lib.rk_epilogue(acc.data_ptr(), int(is_int32), cols, rows, row_scale.data_ptr(), _address(col_scale),
                        _address(bias), int(gelu), _address(out), _address(q), _address(scale), int(bool(quantize))):
        raise MemoryError("rk_epilogue could not allocate its row buffers")
    return out if quantize is None else QuantizedRows(q, scale, bool(quantize))


def epilogue_layernorm(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor | None,
                       bias: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, norm_bias: torch.Tensor,
                       eps: float, out: torch.Tensor | None = None,
                       quantize: bool | None = None) -> tuple[torch.Tensor, QuantizedRows | None]:
    """LayerNorm(epilogue(acc) + residual) * weight + norm_bias in one pass over each row (the
    epilogue as ``epilogue``'s, without GELU): acc (rows, cols) contiguous, residual (rows, cols)
    float32 with unit stride along cols -> (out (rows, cols) float32, written into ``out`` when
    given, which may be ``residual``; the rows quantized for the next GEMM with ``quantize``
    (False: int8, True: uint8 + 128), else None)."""
    assert acc.is_contiguous() and acc.dtype in (torch.int32, torch.float32), (acc.dtype, acc.stride())
    assert residual.dtype == torch.float32 and residual.stride(1) == 1, (residual.dtype, residual.stride())
    rows, cols = acc.shape
    out = torch.empty_like(residual, memory_format=torch.contiguous_format) if out is None else out
    if out.stride() != residual.stride():  # one row stride for both in the C code
        result, quantized = epilogue_layernorm(acc, row_scale, col_scale, bias, residual, weight, norm_bias, eps,
                                               None, quantize)
        return out.copy_(result), quantized
    q = scale = None
    if quantize is not None:
        q = torch.empty(rows, cols, dtype=torch.uint8 if quantize else torch.int8)
        scale = torch.empty(rows, dtype=torch.float32)
    row_scale, weight, norm_bias = row_scale.contiguous(), weight.float().contiguous(), norm_bias.float().contiguous()
    col_scale = None if col_scale is None else col_scale.contiguous()

    if _lib.rk_epilogue_layernorm(acc.data_ptr(), int(acc.dtype == torch.int32), cols, rows, row_scale.data_ptr(),
                                  _address(col_scale), _address(bias), residual.data_ptr(), residual.stride(0),
                                  weight.data_ptr(), norm_bias.data_ptr(), eps, out.data_ptr(), _address(q),
                                  _address(scale), int(bool(quantize))):
        raise MemoryError("rk_epilogue_layernorm could not allocate its row buffers")
    return out, (None if quantize is None else QuantizedRows(q, scale, bool(quantize)))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU of a contiguous float32 tensor with the C code's erf (for tests)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _lib.rk_gelu(x.data_ptr(), x.numel(), out.data_ptr())
    return out
