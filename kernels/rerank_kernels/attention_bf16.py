"""Variable-length attention on the CPU with bfloat16 dot products (csrc/attention_bf16.c), the
int8 forward's attention where the CPU has AVX512_BF16.

With the GEMMs in int8, attention was a fifth to a quarter of the forward in PyTorch's float32
flash kernel (benchmarks.profile_forward; its bfloat16 kernel is no faster here). This kernel
rounds Q, K, V and the softmax probabilities to bfloat16 and multiplies them with VDPBF16PS at
twice float32's rate; scores, softmax and the output accumulate in float32. The rounding adds
errors of bfloat16's size (~0.4% of a value), far below int8's, and the same whatever the batch:
each (sequence, head) is computed alone (tests/test_attention_bf16.py). The reference is
rerank_kernels.attention.varlen_attention_torch.
"""
from __future__ import annotations

import ctypes

import torch

from rerank_kernels import native

MAX_HEAD_DIM = 256
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    lib, why = native.library()
    if lib is None:
        return None, why
    if not lib.rk_attention_supported():
        return None, "this CPU lacks AVX512_BF16"
    lib.rk_attention_bf16.argtypes = (_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _f32,
                                      _ptr, _i64)
    lib.rk_attention_bf16.restype = ctypes.c_int
    return lib, None


_lib, _missing = _load()


def missing() -> str | None:
    """None when this kernel runs here, else why not."""
    return _missing


def shape_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the kernel takes these (total, heads, dim) float32 views, else why not."""
    dim = q.shape[-1]
    if dim % 16 or dim > MAX_HEAD_DIM:
        return f"head dim {dim} is not a multiple of 16 up to {MAX_HEAD_DIM}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != dim:
            return f"{name} is not float32 (tokens, heads, dim) with heads and dim contiguous"
    if k.stride(0) != v.stride(0):
        return "k and v rows are not equally far apart"
    return None


def varlen_attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          scale: float) -> torch.Tensor:
    """q (total_q, heads, dim), k/v (total_k, heads, dim) float32 (views of a fused QKV: rows may
    be further apart than heads * dim), cu_seqlens_* (batch + 1,) int32 -> (total_q, heads, dim)
    float32. Bidirectional (no mask): each query attends to every key of its sequence."""
    problem = shape_problem(q, k, v)
    if problem:
        raise ValueError(f"varlen_attention_bf16: {problem}")
    heads, dim = q.shape[1], q.shape[2]
    out = torch.empty(q.shape[0], heads, dim, dtype=torch.float32)
    cu_q, cu_k = cu_seqlens_q.to(torch.int32).contiguous(), cu_seqlens_k.to(torch.int32).contiguous()
    # the C code sizes its buffers by the longest key sequence: taken from cu_seqlens_k itself, so
    # that a max_seqlen_k too small could never make it write past them
    sequences, max_len_k = cu_k.shape[0] - 1, int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.shape[0] > 1 else 0
    if _lib.rk_attention_bf16(q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0), heads, dim,
                              cu_q.data_ptr(), cu_k.data_ptr(), sequences, max_len_k, scale, out.data_ptr(),
                              out.stride(0)):
        raise MemoryError("rk_attention_bf16 could not allocate its buffers")
    return out
