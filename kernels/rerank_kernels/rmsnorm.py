"""Residual add + RMSNorm (pre-norm decoder blocks: Qwen3)."""
import torch

from rerank_kernels._triton import cuda_grid, next_power_of_2, require_triton, tl, triton


def add_rmsnorm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference, as transformers' Qwen3RMSNorm. x, residual (rows, hidden) (residual None: the
    first block) -> (weight * rmsnorm(h), h) with h = x + residual in x's dtype; the statistics in
    fp32, the normalized row rounded to x's dtype before the weight multiplies it."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * normed, h


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _add_rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, hidden, eps,
                        HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per row: h = x + residual (stored, in x's dtype), fp32 statistics, the
    normalized row rounded to the dtype before the weight (as the reference)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    h = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = h + tl.load(residual_ptr + row * hidden + cols, mask=mask, other=0.0)
        tl.store(sum_ptr + row * hidden + cols, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / hidden + eps)
    normed = (hf * rstd).to(out_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * hidden + cols, w * normed, mask=mask)


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernel, same contract as ``add_rmsnorm_torch``."""
    require_triton()
    x = x.contiguous()
    rows, hidden = x.shape
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    if rows == 0:
        return out, summed
    BLOCK_H = next_power_of_2(hidden)
    _add_rmsnorm_kernel[cuda_grid(rows)](
        x, x if residual is None else residual.contiguous(), weight.contiguous(), out, summed, hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_H=BLOCK_H, num_warps=min(max(BLOCK_H // 256, 1), 16))
    return out, summed
