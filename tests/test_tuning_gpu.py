"""On a real GPU: the fused up-projection kernel (autotuned) against its reference at the
model's shapes, and the load-time measurements with the real timer (both timings present,
the chosen ops still correct). Skipped, with the reason under ``-ra``, without CUDA."""
from __future__ import annotations

import pytest
import torch
from tensor_checks import assert_close

from rerank_kernels import ModelShapes, select_ops, tuning
from rerank_kernels.attention import varlen_attention_torch
from rerank_kernels.linear import FFN_UP
from rerank_kernels.linear_gelu import linear_gelu_torch, linear_gelu_triton

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

CUDA = torch.device("cuda")
HIDDEN, INTERMEDIATE, HEADS = 1024, 4096, 16  # bge-reranker-v2-m3
SHAPES_M3 = ModelShapes(HIDDEN, INTERMEDIATE, HEADS, ffn_rows=4096)
TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-4, 1e-4)}


def up_projection(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    weight = torch.randn(INTERMEDIATE, HIDDEN, device=CUDA, generator=g) / HIDDEN ** 0.5
    return weight.to(dtype), (0.5 * torch.randn(INTERMEDIATE, device=CUDA, generator=g)).to(dtype)


# fp16 (the served dtype) in every row tier; bf16 and fp32 in two (each new tier and dtype autotunes)
SHAPES = [(torch.float16, rows) for rows in (1, 37, 64, 300, 4096)] + [
    (dtype, rows) for dtype in (torch.bfloat16, torch.float32) for rows in (37, 4096)]


@pytest.mark.parametrize("dtype,rows", SHAPES)
def test_linear_gelu_autotuned_at_model_shapes(dtype, rows):
    weight, bias = up_projection(dtype)
    x = torch.randn(rows, HIDDEN, device=CUDA).to(dtype)
    assert_close(linear_gelu_triton(x, weight, bias), linear_gelu_torch(x, weight, bias), *TOL[dtype],
                 what=f"{rows} rows {dtype}")


def test_linear_gelu_reads_row_slices():
    weight, bias = up_projection(torch.float16)
    x = torch.randn(5000, HIDDEN, device=CUDA, dtype=torch.float16)[4096:]  # the model's last FFN slice
    assert_close(linear_gelu_triton(x, weight, bias), linear_gelu_torch(x, weight, bias), *TOL[torch.float16],
                 what="row slice")


def test_measurements_with_the_real_timer():
    """What Engine.load runs (select_ops with the model's shapes), with the Triton attention
    backend so that both measurements run: every tier reports both paths' timings, and the
    chosen ops compute the right answer on the model's weights (not the measurement's)."""
    weight, bias = up_projection(torch.float16)
    ops = select_ops(CUDA, "triton", dtype=torch.float16, shapes=SHAPES_M3)
    ffn, attention = ops.choices[tuning.FFN_UP], ops.choices[tuning.ATTENTION]
    assert list(ffn) == ["rows<=64", "rows<=512", "rows>512"]
    for tier in ffn.values():
        assert set(tier["timings_ms"]) == {tuning.FFN_BASELINE, tuning.FFN_FUSED}, tier  # the fused kernel ran
        assert all(ms > 0 for ms in tier["timings_ms"].values())
    assert sorted(attention) == ["block_m=128", "block_m=16", "block_m=64"]
    for tier in attention.values():
        assert "default" in tier["timings_ms"] and len(tier["timings_ms"]) > 1, tier
    for rows in (1, 64, 65, 4096):
        x = torch.randn(rows, HIDDEN, device=CUDA, dtype=torch.float16)
        assert_close(ops.pack(FFN_UP, weight, bias)(x), linear_gelu_torch(x, weight, bias), *TOL[torch.float16],
                     what=f"chosen FFN op, {rows} rows")
    for args in tuning.attention_workloads(HEADS, HIDDEN // HEADS, torch.float16, CUDA, tokens=2048).values():
        q, k, v, *rest = args
        assert_close(ops.varlen_attention(*args), varlen_attention_torch(q.float(), k.float(), v.float(), *rest),
                     *TOL[torch.float16], what="chosen attention configuration")


def test_other_attention_backends_are_not_measured():
    ops = select_ops(CUDA, "torch-sdpa", dtype=torch.float16, shapes=SHAPES_M3)
    assert tuning.ATTENTION not in ops.choices and FFN_UP in ops.choices


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_dtypes_measure_and_run(dtype):
    """--dtype bfloat16 / float32 on CUDA: the measurements run in that dtype and the chosen
    up-projection is right."""
    weight, bias = up_projection(dtype)
    ops = select_ops(CUDA, "triton", dtype=dtype, shapes=SHAPES_M3)
    x = torch.randn(300, HIDDEN, device=CUDA).to(dtype)
    assert_close(ops.pack(FFN_UP, weight, bias)(x), linear_gelu_torch(x, weight, bias), *TOL[dtype], what=str(dtype))
