"""Bias add + exact (erf) GELU, the FFN's first activation."""
import torch
import torch.nn.functional as F


def bias_gelu_torch(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reference. x (rows, features), bias (features,) -> gelu_erf(x + bias), computed in fp32."""
    return F.gelu(x.float() + bias.float(), approximate="none").to(x.dtype)
