"""SwiGLU: silu(gate) * up, the decoder MLP's activation over the fused gate/up GEMM's output."""
import torch
import torch.nn.functional as F

from rerank_kernels._triton import cuda_grid, require_triton, tl, triton


def swiglu_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference, as transformers' Qwen3MLP (in the input's dtype): gate_up (rows, 2 * ffn), the
    gate's columns first -> silu(gate) * up (rows, ffn)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- Triton


@triton.jit(do_not_specialize=["n_elements"])
def _swiglu_kernel(gate_up_ptr, out_ptr, n_elements, ffn, BLOCK: tl.constexpr):
    """Flat over the (rows, ffn) output; silu in fp32, rounded to the dtype as F.silu does,
    then the product in the dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    row, col = offs // ffn, offs % ffn
    gate = tl.load(gate_up_ptr + row * 2 * ffn + col, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * ffn + ffn + col, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + offs, silu * up, mask=mask)


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused kernel, same contract as ``swiglu_torch``."""
    require_triton()
    gate_up = gate_up.contiguous()
    rows, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, ffn), device=gate_up.device, dtype=gate_up.dtype)
    n = out.numel()
    if n:
        BLOCK = 1024
        _swiglu_kernel[cuda_grid(triton.cdiv(n, BLOCK))](gate_up, out, n, ffn, BLOCK=BLOCK, num_warps=4)
    return out


def swiglu_inplace(gate_up: torch.Tensor) -> torch.Tensor:
    """CPU path: silu written into the gate half (a fresh GEMM output), then the product."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)
