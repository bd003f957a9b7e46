"""Sliding-window (local) varlen attention, non-causal, for ModernBERT's local layers.

A token attends to the keys of its own sequence at distance <= ``window`` on either side (the edge
included: transformers' ``|i - j| <= local_attention // 2``), never across the sequences of a batch.

q, k, v (total, heads, dim), cu_seqlens (batch + 1,) int32 -> (total, heads, dim).
"""
import torch
import torch.nn.functional as F

from rerank_kernels.attention import _flash_attn_varlen_func, _torch_varlen_attn

# Queries per SDPA call in a sequence longer than the window: each block reads its keys from
# window before its first query to window after its last, so the cost grows with the length,
# not its square (at window 64: keys 2.5x the block's queries).
QUERY_BLOCK = 256


def local_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, window: int, scale: float) -> torch.Tensor:
    """Reference and CPU path: per sequence, blocks of QUERY_BLOCK queries against their band of
    keys with a boolean mask (none where the whole sequence is within the window). Block edges
    follow positions within the sequence, so a sequence's output depends on its own q, k, v only:
    batch invariant by construction."""
    out = torch.empty_like(q)
    starts = cu_seqlens.tolist()
    for s0, s1 in zip(starts[:-1], starts[1:], strict=True):
        n = s1 - s0
        block = n if n <= window + 1 else QUERY_BLOCK
        for b0 in range(0, n, block):
            b1, k0, k1 = min(n, b0 + block), max(0, b0 - window), min(n, b0 + block + window)
            mask = None
            if n > window + 1:  # |key position - query position|, both within the sequence
                keys, queries = torch.arange(k0, k1, device=q.device), torch.arange(b0, b1, device=q.device)
                mask = (keys[None, :] - queries[:, None]).abs() <= window
            qs, ks, vs = (x.transpose(0, 1)[None] for x in (q[s0 + b0:s0 + b1], k[s0 + k0:s0 + k1],
                                                             v[s0 + k0:s0 + k1]))  # (1, heads, len, dim)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
            out[s0 + b0:s0 + b1] = o[0].transpose(0, 1)
    return out


def local_attention_flash_attn(q, k, v, cu_seqlens, max_seqlen, window, scale):
    """flash-attn's varlen forward with its window (inclusive on both sides: (w, w))."""
    return _flash_attn_varlen_func()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale,
                                     causal=False, window_size=(window, window))


def local_attention_torch_varlen(q, k, v, cu_seqlens, max_seqlen, window, scale):
    """PyTorch's own FlashAttention varlen forward (torch >= 2.13: ``window_size``)."""
    return _torch_varlen_attn()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                                window_size=(window, window))


# attention backend name (rerank_kernels.attention) -> the windowed function; the others (the
# Triton varlen kernel has no window) run the reference
LOCAL_ATTENTION = {"flash-attn": local_attention_flash_attn, "torch-varlen": local_attention_torch_varlen}


def select_local_attention(backend: str):
    """The sliding-window varlen attention for an attention backend chosen by ``select_attention``."""
    return LOCAL_ATTENTION.get(backend, local_attention_torch)
