"""The CPU attention (varlen_attention_torch): one SDPA call per group of equal-length
sequences, and batch invariant: a sequence's output is bitwise the same alone, in any group,
at any position (torch.equal, not a tolerance), in fp32 and bf16, for every layer's shape
(all queries) and the last layer's (the first token's query only)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rerank_kernels import attention
from rerank_kernels.attention import GROUP_MAX_LEN, GROUP_MIN_SEQS, varlen_attention_torch

SHORT, LONG = 37, GROUP_MAX_LEN + 45  # grouped / always one call per sequence
HEADS = [(4, 16), (12, 32), (16, 64)]  # (heads, head_dim): tiny-ish, small model, full model


def fused_qkv(total: int, heads: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(total, 3, heads, dim): q, k, v are views into it, as the model's fused QKV GEMM gives them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(total, 3, heads, dim, generator=g).to(dtype)


def attend(seqs: list[torch.Tensor], first_token_only: bool) -> list[torch.Tensor]:
    """seqs: (len, 3, heads, dim) each -> their outputs ((len or 1), heads, dim), from one call
    over all of them concatenated, as a batch of the model runs it."""
    lengths = [s.shape[0] for s in seqs]
    fused = torch.cat(seqs)
    q, k, v = fused[:, 0], fused[:, 1], fused[:, 2]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    if first_token_only:  # the last layer: each sequence's <s> query against all its keys
        q = q[cu[:-1].long()]
        cu_q, max_q = torch.arange(len(seqs) + 1, dtype=torch.int32), 1
    else:
        cu_q, max_q = cu, max(lengths)
    out = varlen_attention_torch(q, k, v, cu_q, cu, max_q, max(lengths), q.shape[-1] ** -0.5)
    return list(out.split((cu_q[1:] - cu_q[:-1]).tolist()))


def reference(s: torch.Tensor, first_token_only: bool) -> torch.Tensor:
    """float64 attention of one sequence (len, 3, heads, dim) -> (len or 1, heads, dim)."""
    q, k, v = (s[:, i].double().transpose(0, 1) for i in range(3))
    if first_token_only:
        q = q[:, :1]
    p = torch.softmax(q @ k.transpose(-1, -2) * s.shape[-1] ** -0.5, dim=-1)
    return (p @ v).transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,dim", HEADS)
@pytest.mark.parametrize("first_token_only", [False, True], ids=["all-queries", "first-token"])
def test_a_sequence_is_bitwise_the_same_alone_and_in_any_group(dtype, heads, dim, first_token_only):
    # equal-length groups below and above GROUP_MIN_SEQS, a long group (one call each),
    # a length of its own, and lengths 1 and 2; shuffled, so group members are interleaved
    lengths = [SHORT] * (GROUP_MIN_SEQS + 2) + [LONG] * 2 + [11] * 2 + [5, 1, 2, 2]
    order = np.random.default_rng(0).permutation(len(lengths))
    lengths = [lengths[i] for i in order]
    fused = fused_qkv(sum(lengths), heads, dim, dtype, seed=heads)
    seqs = list(fused.split(lengths))
    together = attend(seqs, first_token_only)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for i, s in enumerate(seqs):
        alone = attend([s], first_token_only)[0]
        assert torch.equal(together[i], alone), f"sequence {i} (length {lengths[i]}) differs alone and in the batch"
        torch.testing.assert_close(alone.double(), reference(s, first_token_only), atol=tol, rtol=tol)
    # any position within its group, any group size (1 = the per-sequence call)
    short = [s for s in seqs if s.shape[0] == SHORT]
    target = short[0]
    for size in (1, 2, GROUP_MIN_SEQS, len(short)):
        for pos in (0, size - 1):
            group = short[1:size]
            group.insert(pos, target)
            got = attend(group, first_token_only)[pos]
            assert torch.equal(got, together[lengths.index(SHORT)]), f"group of {size}, position {pos}"


@pytest.mark.parametrize("first_token_only", [False, True], ids=["all-queries", "first-token"])
def test_equal_lengths_share_one_call(monkeypatch, first_token_only):
    """GROUP_MIN_SEQS equal short sequences: one attention call; long ones or fewer: one each;
    one-row queries (the last layer): one each."""
    calls, attend_one = [], attention._attend
    monkeypatch.setattr(attention, "_attend", lambda q, *a: calls.append(q.shape[0]) or attend_one(q, *a))
    fused = fused_qkv(GROUP_MIN_SEQS * SHORT + 2 * LONG + (GROUP_MIN_SEQS - 1) * 9, 2, 16, torch.float32, 0)
    lengths = [SHORT] * GROUP_MIN_SEQS + [LONG] * 2 + [9] * (GROUP_MIN_SEQS - 1)
    attend(list(fused.split(lengths)), first_token_only)
    if first_token_only:
        assert calls == [1] * len(lengths)
    else:
        assert sorted(calls) == sorted([GROUP_MIN_SEQS] + [1] * 2 + [1] * (GROUP_MIN_SEQS - 1))


def test_the_fused_cpu_kernel_is_what_grouping_relies_on():
    """The premise of grouping, checked on this torch: PyTorch's fused CPU flash kernel gives
    each (n, heads, len, dim) member what it gives it alone. (One query row is not, in fp32 with
    2 threads on torch 2.13: its split of the keys follows the group's size, which is why the
    last layer keeps one call per sequence.)"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 16, 40, 64, generator=g) for _ in range(3))
    grouped = F.scaled_dot_product_attention(q, k, v)
    assert all(torch.equal(F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1]), grouped[i:i + 1])
               for i in range(6))


def test_empty_query_ranges_and_bf16_output_dtype():
    fused = fused_qkv(30, 2, 16, torch.bfloat16, 1)
    q, k, v = fused[:, 0], fused[:, 1], fused[:, 2]
    cu_k = torch.tensor([0, 10, 20, 30], dtype=torch.int32)
    cu_q = torch.tensor([0, 1, 1, 2], dtype=torch.int32)  # the second sequence asks nothing
    out = varlen_attention_torch(q[:2], k, v, cu_q, cu_k, 1, 10, 0.25)
    assert out.shape == (2, 2, 16) and out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
