"""Embedding gather + positions + token type + LayerNorm, in one pass on the GPU.

Positions are derived from ``cu_seqlens``: token ``t`` of sequence ``i`` gets
``position_offset + (t - cu_seqlens[i])`` (RoBERTa: ``padding_idx + 1 = 2``).
"""
import torch
import torch.nn.functional as F


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int, offset: int) -> torch.Tensor:
    """(batch + 1,) int32 offsets -> (total,) int64 position ids starting at ``offset``."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_start = torch.repeat_interleave(starts, lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - seq_start + offset


def embed_layernorm_torch(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    position_offset: int,
) -> torch.Tensor:
    """Reference. input_ids (total,), cu_seqlens (batch + 1,) int32, word (vocab, hidden),
    position (max_positions, hidden), token_type (hidden,) -> (total, hidden) in word's dtype.
    Statistics in fp32."""
    pos_ids = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0], position_offset)
    x = word[input_ids].float() + position[pos_ids].float() + token_type.float()
    return F.layer_norm(x, (x.shape[-1],), weight.float(), bias.float(), eps).to(word.dtype)
