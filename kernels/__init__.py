"""The ops the model calls, chosen once per device: PyTorch references on the CPU,
fused Triton kernels and FlashAttention varlen on CUDA."""
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.attention import varlen_attention_torch
from kernels.embeddings import embed_layernorm_torch
from kernels.gelu import bias_gelu_torch
from kernels.layernorm import add_layernorm_torch


@dataclass(frozen=True)
class Ops:
    embed_layernorm: Callable
    add_layernorm: Callable
    bias_gelu: Callable
    varlen_attention: Callable
    attention_backend: str


TORCH_OPS = Ops(
    embed_layernorm=embed_layernorm_torch,
    add_layernorm=add_layernorm_torch,
    bias_gelu=bias_gelu_torch,
    varlen_attention=varlen_attention_torch,
    attention_backend="torch-sdpa",
)


def select_ops(device: torch.device, attention: str | None = None) -> Ops:
    """The single place that picks kernels for a device. ``attention`` forces a backend."""
    if device.type == "cpu":
        if attention not in (None, "torch-sdpa"):
            raise ValueError(f"attention backend {attention!r} needs CUDA; the CPU has 'torch-sdpa'")
        return TORCH_OPS
    raise NotImplementedError("CUDA kernels are not wired yet")
