"""Bias add + exact (erf) GELU, the FFN's first activation."""
import torch
import torch.nn.functional as F

from rerank_kernels._triton import cuda_grid, require_triton, tl, triton


def bias_gelu_torch(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reference. x (rows, features), bias (features,) -> gelu_erf(x + bias), computed in fp32."""
    return F.gelu(x.float() + bias.float(), approximate="none").to(x.dtype)


# ----------------------------------------------------------------------------- Triton


# n_elements changes with every batch: not specialized (1 or a multiple of 16 would each
# compile a variant while serving).
@triton.jit(do_not_specialize=["n_elements"])
def _bias_gelu_kernel(x_ptr, bias_ptr, out_ptr, n_elements, features, BLOCK: tl.constexpr):
    """Flat elementwise over a contiguous (rows, features) tensor; fp32 math, one downcast."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # rows * 4096 can pass 2**31
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + offs % features, mask=mask, other=0.0).to(tl.float32)
    # Exact GELU, x * Phi(x), as the checkpoint was trained with (not the tanh form).
    y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _bias_gelu_launch(x, bias):
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    BLOCK = 1024
    _bias_gelu_kernel[cuda_grid(triton.cdiv(n, BLOCK))](x, bias, out, n, x.shape[-1], BLOCK=BLOCK, num_warps=4)
    return out


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fused kernel, same contract as ``bias_gelu_torch``: x (rows, features), bias (features,)
    -> gelu_erf(x + bias) (rows, features) in x's dtype, computed in fp32."""
    require_triton()
    return _bias_gelu_launch(x.contiguous(), bias.contiguous())


def bias_gelu_inplace(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """CPU path: the same op written into ``x`` (a fresh GEMM output the caller gives up).
    Large fresh tensors cost page faults and zero-filling on every CPU allocation."""
    if x.dtype != torch.float32:
        return bias_gelu_torch(x, bias)
    return torch.ops.aten.gelu_(x.add_(bias), approximate="none")
