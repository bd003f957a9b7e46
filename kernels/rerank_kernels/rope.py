"""Rotary position embeddings without a norm (ModernBERT's q and k), in place.

x (rows, heads, dim) (a view of the fused QKV projection allowed, each head's dim contiguous),
positions (rows,) int64, cos and sin (max_positions, dim / 2) fp32 (``rotary.rope_table``). As
transformers' ``apply_rotary_pos_emb`` for ModernBERT: cos and sin rounded to x's dtype, the
rotation (rotate_half form) computed in fp32, the result rounded back.
"""
import torch

from rerank_kernels._triton import cuda_grid, next_power_of_2, require_triton, tl, triton


def rope_torch(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Reference (and the CPU path), written into x."""
    half = x.shape[-1] // 2
    c = cos[positions].to(x.dtype).float()[:, None]  # (rows, 1, half)
    s = sin[positions].to(x.dtype).float()[:, None]
    xf = x.float()
    first, second = xf[..., :half], xf[..., half:]
    x.copy_(torch.cat([first * c - second * s, second * c + first * s], dim=-1))


@triton.jit
def _rope_kernel(x_ptr, positions_ptr, cos_ptr, sin_ptr, row_stride, head_stride, HALF: tl.constexpr):
    """One program per (row, head): the rotation in fp32 with cos and sin rounded to x's dtype."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    base = x_ptr + row * row_stride + head * head_stride
    i = tl.arange(0, HALF)
    first = tl.load(base + i)
    dtype = first.dtype
    f1 = first.to(tl.float32)
    f2 = tl.load(base + HALF + i).to(tl.float32)
    pos = tl.load(positions_ptr + row)
    c = tl.load(cos_ptr + pos * HALF + i).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + pos * HALF + i).to(dtype).to(tl.float32)
    tl.store(base + i, (f1 * c - f2 * s).to(dtype))
    tl.store(base + HALF + i, (f2 * c + f1 * s).to(dtype))


def rope_triton(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Fused kernel, same contract as ``rope_torch``."""
    require_triton()
    rows, heads, dim = x.shape
    if rows == 0:
        return
    if dim // 2 != next_power_of_2(dim // 2) or dim % 2 or x.stride(-1) != 1:
        raise ValueError(f"rope: head_dim / 2 must be a power of two with dense heads, got {dim}, {x.stride()}")
    _rope_kernel[cuda_grid(rows, heads)](x, positions.contiguous(), cos.contiguous(), sin.contiguous(),
                                         x.stride(0), x.stride(1), HALF=dim // 2, num_warps=1)
