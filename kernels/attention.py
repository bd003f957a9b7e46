"""Non-causal varlen attention over unpadded sequences.

Queries and keys may use different offsets: the last encoder layer asks only
each sequence's first token (``cu_seqlens_q = arange(batch + 1)``, ``max_seqlen_q = 1``)
against all of its keys.
"""
import torch
import torch.nn.functional as F


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> torch.Tensor:
    """Reference and CPU path: one SDPA call per sequence, nothing padded.

    q (total_q, heads, head_dim), k/v (total_k, heads, head_dim),
    cu_seqlens_* (batch + 1,) int32 -> (total_q, heads, head_dim)."""
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        qs, qe, ks, ke = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if qe == qs:
            continue
        o = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1), scale=scale
        )
        out[qs:qe] = o.transpose(0, 1)
    return out
