"""The ops the model calls, chosen once per device: PyTorch references on the CPU,
fused Triton kernels and FlashAttention varlen on CUDA."""
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rerank_kernels._triton import HAS_TRITON
from rerank_kernels.attention import (
    ATTENTION_BACKENDS,
    available_attention_backends,
    select_attention,
    varlen_attention_torch,
    varlen_attention_triton,
)
from rerank_kernels.embeddings import embed_layernorm_torch, embed_layernorm_triton
from rerank_kernels.gelu import bias_gelu_inplace, bias_gelu_torch, bias_gelu_triton
from rerank_kernels.layernorm import add_layernorm_inplace, add_layernorm_torch, add_layernorm_triton
from rerank_kernels.linear_gelu import linear_gelu_unfused

__all__ = ["ATTENTION_BACKENDS", "Ops", "TORCH_OPS", "available_attention_backends", "select_ops", "triton_ops"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ops:
    embed_layernorm: Callable
    add_layernorm: Callable
    bias_gelu: Callable
    varlen_attention: Callable
    attention_backend: str
    # The FFN's up-projection where a load-time measurement (rerank_kernels.tuning, CUDA) found
    # something faster than the GEMM then bias_gelu, e.g. the fused Triton kernel; see linear_gelu.
    measured_linear_gelu: Callable | None = None
    # What load-time measurements chose, with their timings, by op (shown by /info).
    choices: dict = field(default_factory=dict, compare=False)

    def linear_gelu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (rows, in), weight (out, in), bias (out,) -> gelu_erf(x @ weight^T + bias) (rows, out):
        the measured choice, else the GEMM then this set's bias_gelu."""
        if self.measured_linear_gelu is not None:
            return self.measured_linear_gelu(x, weight, bias)
        return linear_gelu_unfused(x, weight, bias, self.bias_gelu)


# The CPU path: the references, with the two glue ops writing into their (fresh) input.
TORCH_OPS = Ops(
    embed_layernorm=embed_layernorm_torch,
    add_layernorm=add_layernorm_inplace,
    bias_gelu=bias_gelu_inplace,
    varlen_attention=varlen_attention_torch,
    attention_backend="torch-sdpa",
)


def triton_ops(attention: Callable = varlen_attention_triton, attention_backend: str = "triton") -> Ops:
    """The CUDA op set: the Triton glue kernels with ``attention`` (default: the Triton kernel;
    under TRITON_INTERPRET=1 every op of it runs on CPU tensors, as the whole-model test does)."""
    return Ops(embed_layernorm_triton, add_layernorm_triton, bias_gelu_triton, attention, attention_backend)


def select_ops(device: torch.device | str, attention: str | None = None, *, dtype: torch.dtype | None = None) -> Ops:
    """The single place that picks kernels for a device.

    ``attention`` forces a backend by name (see ``ATTENTION_BACKENDS``); an unknown or
    unusable one raises ValueError. ``dtype`` (default: fp16 on CUDA) rules out the
    FlashAttention backends for fp32 models. On CUDA the glue ops are Triton kernels."""
    device = torch.device(device)
    name, attn = select_attention(device, attention, dtype)
    if device.type != "cuda":
        return TORCH_OPS
    if not HAS_TRITON:
        log.warning("triton is not installed: CUDA runs the PyTorch reference LayerNorm/GELU/embedding ops")
        return Ops(embed_layernorm_torch, add_layernorm_torch, bias_gelu_torch, attn, name)
    return triton_ops(attn, name)
