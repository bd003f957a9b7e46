"""Per-head RMSNorm of q and k, then rotary embeddings (Qwen3's attention input), in place.

Positions come per row (a pair's tokens from 0; a document after a shared prefix continues at
the prefix's length): ``rope_table`` is computed once per model, (max_positions, head_dim / 2) fp32
each, as transformers computes it, and the model gathers its rows by position once per forward
(``cos[positions]``), for every layer's q and k.
"""
import torch

from rerank_kernels._triton import cuda_grid, next_power_of_2, require_triton, tl, triton


def rope_table(max_positions: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (max_positions, head_dim // 2) fp32: transformers' default RoPE
    (inv_freq = 1 / theta^(2i / dim); angle = position * inv_freq, in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(device), angles.sin().to(device)


def norm_rope_torch(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    eps: float) -> None:
    """Reference, as transformers' Qwen3Attention does to q and to k: x (rows, heads, dim) (a
    view of the fused projection allowed), weight (dim,), cos/sin (rows, dim / 2) fp32 (the
    table's rows at each row's position); each head row RMS-normalized (fp32 statistics, rounded
    to the dtype, times the weight), then rotated (rotate_half form, cos and sin rounded to the
    dtype). Written into x."""
    xf = x.float()
    normed = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    half = x.shape[-1] // 2
    c, s = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]  # (rows, 1, half)
    first, second = normed[..., :half], normed[..., half:]
    x[..., :half] = first * c - second * s
    x[..., half:] = second * c + first * s


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _norm_rope_kernel(x_ptr, weight_ptr, cos_ptr, sin_ptr, row_stride, head_stride, eps,
                      HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """One program per (row, head): the head's RMSNorm (fp32 statistics, rounded to the dtype,
    times the weight) then the rotation, in the dtype, as the reference."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    base = x_ptr + row * row_stride + head * head_stride
    i = tl.arange(0, HALF)
    first = tl.load(base + i)
    second = tl.load(base + HALF + i)
    f1, f2 = first.to(tl.float32), second.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / HEAD_DIM + eps)
    dtype = first.dtype
    n1 = tl.load(weight_ptr + i) * (f1 * rstd).to(dtype)
    n2 = tl.load(weight_ptr + HALF + i) * (f2 * rstd).to(dtype)
    c = tl.load(cos_ptr + row * HALF + i).to(dtype)
    s = tl.load(sin_ptr + row * HALF + i).to(dtype)
    tl.store(base + i, n1 * c - n2 * s)
    tl.store(base + HALF + i, n2 * c + n1 * s)


def norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float) -> None:
    """Fused kernel, same contract as ``norm_rope_torch`` (each head's dim contiguous)."""
    require_triton()
    rows, heads, dim = x.shape
    if rows == 0:
        return
    if dim != next_power_of_2(dim) or x.stride(-1) != 1:
        raise ValueError(f"norm_rope: head_dim must be a power of two with dense heads, got {dim}, {x.stride()}")
    _norm_rope_kernel[cuda_grid(rows, heads)](
        x, weight.contiguous(), cos.contiguous(), sin.contiguous(), x.stride(0),
        x.stride(1), eps, HEAD_DIM=dim, HALF=dim // 2, num_warps=1)
