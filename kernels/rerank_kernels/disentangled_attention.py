"""DeBERTa-v2's disentangled attention over unpadded variable-length sequences.

The score of query i and key j adds to content-to-content ``q_i . k_j`` the content-to-position
term ``q_i . pos_key[r(i, j)]`` (c2p) and the position-to-content term ``k_j . pos_query[r'(i, j)]``
(p2c), where r and r' index the relative position embeddings by the log-bucketed distance i - j
(``relative_index``); all three are divided by the same scale. The two relative terms are an
additive float bias per (head, query, key), built per sequence and given to SDPA as ``attn_mask``.

q, k, v (total, heads, dim); pos_query, pos_key (2 * span, heads, dim) or None (a term the
config leaves out); c2p_index, p2c_index (max_len, max_len) int64 -> (total, heads, dim).
"""
import torch
import torch.nn.functional as F


def log_bucket_position(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """transformers' ``make_log_bucket_position``, op for op (its float32 logs decide the buckets):
    distances below buckets // 2 stay as they are, longer ones share log-spaced buckets."""
    sign = torch.sign(relative)
    mid = buckets // 2
    abs_pos = torch.where((relative < mid) & (relative > -mid), torch.tensor(mid - 1).type_as(relative),
                          torch.abs(relative))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative.type_as(log_pos), log_pos * sign)


def relative_index(max_len: int, span: int, buckets: int, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c2p, p2c) (max_len, max_len) int64: the relative embedding rows of each (query, key) pair,
    as transformers clamps them: c2p = r(i - j) + span, p2c[a, b] = -r(a - b) + span (read transposed)."""
    positions = torch.arange(max_len)
    relative = positions[:, None] - positions[None, :]
    if buckets > 0 and max_position > 0:
        relative = log_bucket_position(relative, buckets, max_position)
    relative = relative.long()
    return (torch.clamp(relative + span, 0, 2 * span - 1), torch.clamp(-relative + span, 0, 2 * span - 1))


def disentangled_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                 pos_query: torch.Tensor | None, pos_key: torch.Tensor | None,
                                 c2p_index: torch.Tensor, p2c_index: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference and CPU path: per sequence, the relative bias (heads, n, n) then one SDPA call with
    it (scores divided by ``scale``, the bias already divided). A sequence's output depends on its
    own q, k, v only: batch invariant by construction."""
    out = torch.empty_like(q)
    starts = cu_seqlens.tolist()
    for s0, s1 in zip(starts[:-1], starts[1:], strict=True):
        n = s1 - s0
        qs, ks, vs = (x[s0:s1].transpose(0, 1) for x in (q, k, v))  # (heads, n, dim)
        # a bucket is never farther than its distance: only the embedding rows within n - 1 of
        # the middle are read, so only they are multiplied
        middle = (pos_key if pos_key is not None else pos_query).shape[0] // 2
        lo, hi = max(0, middle - n + 1), min(2 * middle, middle + n)
        bias = None
        if pos_key is not None:  # c2p: bias[h, i, j] = q_i . pos_key[c2p[i, j]]
            c2p = torch.matmul(qs, pos_key[lo:hi].permute(1, 2, 0))  # (heads, n, rows read)
            bias = c2p.gather(-1, (c2p_index[:n, :n] - lo).expand(qs.shape[0], n, n)) / scale
        if pos_query is not None:  # p2c: bias[h, i, j] += k_j . pos_query[p2c[j, i]]
            p2c = torch.matmul(ks, pos_query[lo:hi].permute(1, 2, 0))
            p2c = p2c.gather(-1, (p2c_index[:n, :n] - lo).expand(ks.shape[0], n, n)).transpose(-1, -2) / scale
            bias = p2c if bias is None else bias + p2c
        o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=None if bias is None else
                                           bias[None].to(q.dtype), scale=1.0 / scale)
        out[s0:s1] = o[0].transpose(0, 1)
    return out
