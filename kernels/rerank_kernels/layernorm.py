"""Residual add + LayerNorm (post-norm transformer blocks)."""
import torch
import torch.nn.functional as F

from rerank_kernels._triton import cuda_grid, next_power_of_2, require_triton, tl, triton


def add_layernorm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference. x, residual (rows, hidden) -> LayerNorm(x + residual), statistics in fp32;
    written into ``out`` (rows, hidden) when given (it may be ``residual`` itself)."""
    h = x.float() + residual.float()
    y = F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
    return y if out is None else out.copy_(y)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def layernorm_row(x, cols, hidden, weight_ptr, bias_ptr, eps):
    """LayerNorm of one row held by one program, shared by the fused kernels' epilogues:
    x (BLOCK_H,) fp32 at lanes ``cols``, 0 past ``hidden`` -> (x - mean) * rstd * weight + bias
    (BLOCK_H,) fp32; the caller does the one downcast at its store."""
    mask = cols < hidden
    mean = tl.sum(x, axis=0) / hidden
    centered = tl.where(mask, x - mean, 0.0)  # padding lanes must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return centered * rstd * w + b


@triton.jit
def _add_layernorm_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr,
    hidden, x_stride, residual_stride, out_stride, eps,
    BLOCK_H: tl.constexpr,
):
    """One program per row: add, fp32 statistics, one downcast at the store."""
    row = tl.program_id(0).to(tl.int64)  # rows * stride can pass 2**31
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    h = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)

    y = layernorm_row(h, cols, hidden, weight_ptr, bias_ptr, eps)
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _add_layernorm_launch(x, residual, weight, bias, eps, out):
    rows, hidden = x.shape
    if out is None:
        out = torch.empty((rows, hidden), device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    BLOCK_H = next_power_of_2(hidden)
    num_warps = min(max(BLOCK_H // 256, 1), 16)  # a few elements per thread
    _add_layernorm_kernel[cuda_grid(rows)](
        x, residual, weight, bias, out,
        hidden, x.stride(0), residual.stride(0), out.stride(0), eps,
        BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    return out


def add_layernorm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused kernel, same contract as ``add_layernorm_torch``: x, residual (rows, hidden),
    weight/bias (hidden,) -> LayerNorm(x + residual) (rows, hidden) in x's dtype, written
    straight into ``out`` when given (any row stride, e.g. a slice of a larger tensor; it may
    alias ``residual``: each program loads its whole row before it stores)."""
    require_triton()
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"add_layernorm out= must be a {tuple(x.shape)} {x.dtype} tensor with dense rows, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    # Rows are addressed by their stride; each row's columns must be dense.
    x, residual = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, residual))
    return _add_layernorm_launch(x, residual, weight.contiguous(), bias.contiguous(), eps, out)


def add_layernorm_inplace(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU path: the residual is added into ``x`` (a fresh GEMM output the caller gives up),
    saving one (rows, hidden) allocation per call; ``out`` as in ``add_layernorm_torch``."""
    if x.dtype != torch.float32:
        return add_layernorm_torch(x, residual, weight, bias, eps, out)
    y = F.layer_norm(x.add_(residual), (x.shape[-1],), weight, bias, eps)
    return y if out is None else out.copy_(y)
