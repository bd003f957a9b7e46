"""The bf16 CPU attention (rerank_kernels/csrc/attention_bf16.c) against PyTorch's SDPA in float32
and in bfloat16: errors of bfloat16's size, no larger than SDPA's own bfloat16 kernel by more than
a small factor, every sequence's output independent of its batch and of the thread split."""
from __future__ import annotations

import pytest
import torch

from rerank_kernels import attention_bf16, int8_attention, select_ops
from rerank_kernels.attention import varlen_attention_torch

pytestmark = pytest.mark.skipif(attention_bf16.missing() is not None,
                                reason=f"bf16 attention unavailable: {attention_bf16.missing()}")


def packed(lengths: list[int], heads: int = 4, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]), 3, heads, dim, generator=g) * 2  # fused QKV: rows 3 * heads * dim apart
    return qkv[:, 0], qkv[:, 1], qkv[:, 2], cu


@pytest.mark.parametrize("lengths", [[1], [2, 3], [16, 17, 31, 33], [5, 100, 1, 250, 64], [700]])
@pytest.mark.parametrize("dim", [16, 64])
def test_matches_sdpa_to_bfloat16_rounding(lengths, dim, two_threads):
    q, k, v, cu = packed(lengths, dim=dim)
    scale = dim ** -0.5
    exact = varlen_attention_torch(q, k, v, cu, cu, max(lengths), max(lengths), scale)
    ours = attention_bf16.varlen_attention_bf16(q, k, v, cu, cu, max(lengths), max(lengths), scale)
    theirs = varlen_attention_torch(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, max(lengths), max(lengths),
                                    scale).float()
    ours_error, theirs_error = (ours - exact).abs().max(), (theirs - exact).abs().max()
    assert ours_error <= max(2 * theirs_error, 1e-3), (ours_error, theirs_error)


def test_first_token_queries_against_all_keys():
    """The last layer's shape: one query per sequence (a separate (batch, heads, dim) tensor)."""
    q_all, k, v, cu = packed([40, 7, 129])
    q = q_all[cu[:-1].long()].contiguous()
    cu_q = torch.arange(4, dtype=torch.int32)
    exact = varlen_attention_torch(q, k, v, cu_q, cu, 1, 129, 0.2)
    ours = attention_bf16.varlen_attention_bf16(q, k, v, cu_q, cu, 1, 129, 0.2)
    assert (ours - exact).abs().max() < 3e-2


def test_a_sequence_does_not_depend_on_its_batch(two_threads):
    lengths = [33, 250, 1, 64, 17, 128]
    q, k, v, cu = packed(lengths, seed=3)
    whole = attention_bf16.varlen_attention_bf16(q, k, v, cu, cu, 250, 250, 0.125)
    for i, n in enumerate(lengths):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        alone_cu = torch.tensor([0, n], dtype=torch.int32)
        alone = attention_bf16.varlen_attention_bf16(q[rows], k[rows], v[rows], alone_cu, alone_cu, n, n, 0.125)
        assert torch.equal(alone, whole[rows]), i


def test_shapes_it_does_not_take_go_to_sdpa():
    q, k, v, cu = packed([10, 20], dim=24)  # 24 is not a multiple of 16
    assert attention_bf16.shape_problem(q, k, v)
    with pytest.raises(ValueError, match="head dim 24"):
        attention_bf16.varlen_attention_bf16(q, k, v, cu, cu, 20, 20, 0.2)
    exact = varlen_attention_torch(q, k, v, cu, cu, 20, 20, 0.2)
    assert torch.equal(int8_attention(q, k, v, cu, cu, 20, 20, 0.2), exact)


def test_int8_selects_it_and_an_explicit_backend_keeps_sdpa():
    from rerank_kernels import ModelShapes
    shapes = ModelShapes(hidden=64, intermediate=128, heads=4)
    assert select_ops("cpu", dtype=torch.int8, shapes=shapes, cpu_gemm="torch").attention_backend == "cpu-bf16"
    pinned = select_ops("cpu", "torch-sdpa", dtype=torch.int8, shapes=shapes, cpu_gemm="torch")
    assert pinned.attention_backend == "torch-sdpa"
    assert select_ops("cpu", dtype=torch.float32, shapes=shapes, cpu_gemm="torch").attention_backend == "torch-sdpa"
