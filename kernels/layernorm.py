"""Residual add + LayerNorm (post-norm transformer blocks)."""
import torch
import torch.nn.functional as F


def add_layernorm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Reference. x, residual (rows, hidden) -> LayerNorm(x + residual), statistics in fp32."""
    h = x.float() + residual.float()
    return F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
