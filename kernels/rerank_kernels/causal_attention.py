"""Causal varlen attention with grouped-query heads, for decoders (Qwen3).

A sequence's queries may be fewer than its keys: a document after a shared prefix asks its own
tokens' queries against the prefix's keys and its own; the last layer asks only the last
token's. The causal mask is aligned bottom-right (query i of n sees keys up to
``i + len_k - len_q``), as FlashAttention's varlen ``causal=True`` does.

q (total_q, heads, dim), k/v (total_k, kv_heads, dim) with heads a multiple of kv_heads,
cu_seqlens_* (batch + 1,) int32 -> (total_q, heads, dim).
"""
import functools

import torch
import torch.nn.functional as F

from rerank_kernels.attention import _flash_attn_varlen_func, _torch_varlen_attn


def causal_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           scale: float) -> torch.Tensor:
    """Reference and CPU path: one SDPA call per sequence, on views (nothing padded or copied).
    A sequence's output depends on its own q, k, v only: batch invariant by construction."""
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if q1 == q0:
            continue
        qs, ks, vs = (x.transpose(0, 1)[None] for x in (q[q0:q1], k[k0:k1], v[k0:k1]))  # (1, heads, len, dim)
        len_q, len_k = q1 - q0, k1 - k0
        if len_q == len_k:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bottom_right_mask(len_q, len_k, q.device),
                                               scale=scale, enable_gqa=True)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


# masks up to this many elements are kept (every layer of a forward asks for the same ones)
CACHED_MASK_ELEMENTS = 1 << 20


def bottom_right_mask(len_q: int, len_k: int, device: torch.device) -> torch.Tensor:
    """(len_q, len_k) bool: the queries are the sequence's last len_q tokens."""
    if len_q * len_k <= CACHED_MASK_ELEMENTS:
        return _cached_mask(len_q, len_k, device)
    return torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(len_k - len_q)


@functools.lru_cache(maxsize=256)
def _cached_mask(len_q: int, len_k: int, device: torch.device) -> torch.Tensor:
    return torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(len_k - len_q)


def causal_attention_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """flash-attn's varlen forward, causal (bottom-right), GQA native (fp16/bf16, CUDA)."""
    return _flash_attn_varlen_func()(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     softmax_scale=scale, causal=True)


def causal_attention_torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """PyTorch's own FlashAttention varlen forward (torch >= 2.13 signature: window (-1, 0) is
    causal, bottom-right; GQA native)."""
    return _torch_varlen_attn()(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                scale=scale, window_size=(-1, 0), enable_gqa=True)


# attention backend name (rerank_kernels.attention) -> the causal function; what is not here
# (the Triton varlen kernel is not causal) runs the reference
CAUSAL_ATTENTION = {"flash-attn": causal_attention_flash_attn, "torch-varlen": causal_attention_torch_varlen}


def select_causal_attention(backend: str):
    """The causal varlen attention for an attention backend chosen by ``select_attention``."""
    return CAUSAL_ATTENTION.get(backend, causal_attention_torch)
