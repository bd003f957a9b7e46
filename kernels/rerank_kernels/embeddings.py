"""Embedding gather + positions + token type + LayerNorm, in one pass on the GPU.

Positions are derived from ``cu_seqlens``: token ``t`` of sequence ``i`` gets
``position_offset + (t - cu_seqlens[i])`` (RoBERTa: ``padding_idx + 1 = 2``; BERT: 0).
Token types come per token (BERT: query 0, document 1), or are all 0 when not given
(RoBERTa's one-row table).
"""
import torch
import torch.nn.functional as F

from rerank_kernels._triton import cuda_grid, next_power_of_2, require_triton, tl, triton
from rerank_kernels.layernorm import layernorm_row


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
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference. input_ids (total,), cu_seqlens (batch + 1,) int32, word (vocab, hidden),
    position (max_positions, hidden), token_type (type_vocab, hidden), token_type_ids (total,)
    or None (every token type 0) -> (total, hidden) in word's dtype. Statistics in fp32."""
    pos_ids = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0], position_offset)
    types = token_type[0] if token_type_ids is None else token_type[token_type_ids]
    x = word[input_ids].float() + position[pos_ids].float() + types.float()
    return F.layer_norm(x, (x.shape[-1],), weight.float(), bias.float(), eps).to(word.dtype)


# ----------------------------------------------------------------------------- Triton


# Triton compiles a variant per integer argument that is 1 or a multiple of 16: the pair
# count changes with every batch, so it is not specialized (no compile while serving).
@triton.jit(do_not_specialize=["batch"])
def _embed_layernorm_kernel(
    ids_ptr, type_ids_ptr, cu_seqlens_ptr, word_ptr, position_ptr, token_type_ptr, weight_ptr, bias_ptr, out_ptr,
    batch, hidden, word_stride, position_stride, token_type_stride, out_stride, eps, position_offset,
    BLOCK_H: tl.constexpr, HAS_TYPE_IDS: tl.constexpr,
):
    """One program per token: gather three rows, LayerNorm in fp32, one downcast at the store."""
    row = tl.program_id(0)
    # The token's sequence is the last i with cu_seqlens[i] <= row: a binary search over
    # (batch + 1,) offsets costs log2(batch) scalar loads and no host-side position tensor.
    lo = tl.zeros((), tl.int32)
    hi = tl.zeros((), tl.int32) + batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        right = tl.load(cu_seqlens_ptr + mid) <= row
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    pos = row - tl.load(cu_seqlens_ptr + lo) + position_offset

    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    token = tl.load(ids_ptr + row).to(tl.int64)  # vocab * hidden can pass 2**31
    x = tl.load(word_ptr + token * word_stride + cols, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(position_ptr + pos.to(tl.int64) * position_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_TYPE_IDS:
        token_type = tl.load(type_ids_ptr + row).to(tl.int64)
    else:
        token_type = tl.zeros((), tl.int64)
    x += tl.load(token_type_ptr + token_type * token_type_stride + cols, mask=mask, other=0.0).to(tl.float32)

    y = layernorm_row(x, cols, hidden, weight_ptr, bias_ptr, eps)
    tl.store(out_ptr + row.to(tl.int64) * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _embed_layernorm_launch(input_ids, cu_seqlens, word, position, token_type, weight, bias, eps, position_offset,
                            token_type_ids):
    total, hidden = input_ids.shape[0], word.shape[1]
    out = torch.empty((total, hidden), device=word.device, dtype=word.dtype)
    if total == 0:
        return out
    BLOCK_H = next_power_of_2(hidden)
    # One warp per 256 lanes keeps each thread at a few elements (hidden 1024 -> 4 warps).
    num_warps = min(max(BLOCK_H // 256, 1), 16)
    has_type_ids = token_type_ids is not None
    _embed_layernorm_kernel[cuda_grid(total)](
        input_ids, token_type_ids if has_type_ids else input_ids, cu_seqlens, word, position, token_type, weight,
        bias, out, cu_seqlens.shape[0] - 1, hidden, word.stride(0), position.stride(0), token_type.stride(0),
        out.stride(0), eps, position_offset,
        BLOCK_H=BLOCK_H, HAS_TYPE_IDS=has_type_ids, num_warps=num_warps,
    )
    return out


def embed_layernorm_triton(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    position_offset: int,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused kernel, same contract as ``embed_layernorm_torch``: input_ids (total,) int64,
    cu_seqlens (batch + 1,) int32, word (vocab, hidden), position (max_positions, hidden),
    token_type (type_vocab, hidden), weight/bias (hidden,), token_type_ids (total,) int64 or
    None (type 0) -> (total, hidden) in word's dtype."""
    require_triton()
    # Rows are gathered by their stride; the columns of every table must be dense.
    word, position, token_type = (t if t.stride(-1) == 1 else t.contiguous() for t in (word, position, token_type))
    if token_type_ids is not None:
        token_type_ids = token_type_ids.to(torch.int64).contiguous()
    return _embed_layernorm_launch(
        input_ids.contiguous(), cu_seqlens.contiguous(), word, position, token_type,
        weight.contiguous(), bias.contiguous(), eps, position_offset, token_type_ids,
    )
