"""The int8 GEMMs' C glue (rerank_kernels/csrc/int8_rows.c via rerank_kernels.int8_rows) against
the torch versions in rerank_kernels.linear_int8 and float64: the same quantized values, the
epilogue within float32 rounding, each row's bytes independent of its batch and of the thread split."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rerank_kernels import int8_rows
from rerank_kernels.int8_rows import QuantizedRows
from rerank_kernels.linear_int8 import ACTIVATION_OFFSET, IntMmLinear, OneDnnInt8Linear, _as_quantized, quantize_rows

pytestmark = pytest.mark.skipif(int8_rows.missing() is not None, reason=f"C glue unavailable: {int8_rows.missing()}")


@pytest.mark.parametrize("cols", [1, 7, 16, 17, 1031])
def test_quantize_rows_equals_torch(cols, two_threads):
    x = torch.randn(101, cols, generator=torch.Generator().manual_seed(cols)) * 3
    x[5] = 0  # an all-zero row: the smallest normal scale, zeros
    ours = int8_rows.quantize_rows(x)
    q, scale = quantize_rows(x)
    assert torch.equal(ours.q, q) and torch.equal(ours.scale, scale)
    assert ours.scale[5] == torch.finfo(torch.float32).tiny and not ours.q[5].any()
    shifted = int8_rows.quantize_rows(x, offset=True)
    # uint8 + 128: the signed values shifted (the torch uint8 path adds the zero point before
    # rounding and so rounds a few ties the other way; the C code rounds first)
    assert shifted.q.dtype == torch.uint8 and torch.equal(shifted.q.int(), q.int() + ACTIVATION_OFFSET)


def test_quantize_rows_reads_strided_rows():
    wide = torch.randn(40, 300)
    ours = int8_rows.quantize_rows(wide[:, 10:110])
    q, scale = quantize_rows(wide[:, 10:110].contiguous())
    assert torch.equal(ours.q, q) and torch.equal(ours.scale, scale)


def reference(acc, row_scale, col_scale, bias, gelu):
    y = acc.double() * (1 if col_scale is None else col_scale.double()) * row_scale.double()[:, None]
    y = y if bias is None else y + bias.double()
    return torch.nn.functional.gelu(y) if gelu else y


def gemm_sums(g: torch.Generator, rows: int, cols: int, int32: bool):
    """A GEMM's output as the epilogue gets it: int32 sums with the weight's scale per column, or
    float32 sums with it applied (col_scale None); and each row's activation scale."""
    acc = (torch.randint(-2**20, 2**20, (rows, cols), generator=g, dtype=torch.int32) if int32
           else torch.randn(rows, cols, generator=g) * 50)
    row_scale = torch.rand(rows, generator=g) * 1e-2
    return acc, row_scale, torch.rand(cols, generator=g) * 1e-3 if int32 else None


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("int32", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_epilogue_matches_float64(gelu, int32, with_bias, two_threads):
    g = torch.Generator().manual_seed(0)
    acc, row_scale, col_scale = gemm_sums(g, 67, 333, int32)
    bias = torch.randn(333, generator=g) if with_bias else None
    expected = reference(acc, row_scale, col_scale, bias, gelu)
    got = int8_rows.epilogue(acc.clone(), row_scale, col_scale, bias, gelu)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6)
    # the rows quantized for the next GEMM: exactly the float rows, quantized
    for offset in (False, True):
        fused = int8_rows.epilogue(acc.clone(), row_scale, col_scale, bias, gelu, quantize=offset)
        alone = int8_rows.quantize_rows(got, offset=offset)
        assert fused.offset == offset and torch.equal(fused.q, alone.q) and torch.equal(fused.scale, alone.scale)


def test_epilogue_rows_do_not_depend_on_the_batch(two_threads):
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-2**20, 2**20, (203, 129), generator=g, dtype=torch.int32)
    row_scale, col_scale = torch.rand(203, generator=g), torch.rand(129, generator=g)
    bias = torch.randn(129, generator=g)
    whole = int8_rows.epilogue(acc, row_scale, col_scale, bias, True, quantize=True)
    for start, stop in [(0, 1), (17, 18), (5, 60), (100, 203)]:
        part = int8_rows.epilogue(acc[start:stop].contiguous(), row_scale[start:stop], col_scale, bias, True,
                                  quantize=True)
        assert torch.equal(part.q, whole.q[start:stop]) and torch.equal(part.scale, whole.scale[start:stop])


def test_gelu_is_exact_gelu_to_float32_rounding():
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([0.0, -0.0, 1e-30, 100.0, -100.0])])
    expected = torch.nn.functional.gelu(x.double())
    ours = int8_rows.gelu(x).double()
    torch_error = (torch.nn.functional.gelu(x).double() - expected).abs().max()
    assert (ours - expected).abs().max() <= max(2e-6, 2 * torch_error)


@pytest.mark.parametrize("linear", [IntMmLinear, OneDnnInt8Linear])
def test_quantized_handoff_equals_quantizing_the_output(linear, two_threads):
    """up.quantized(x) for the next GEMM == quantizing up(x): the FFN's fused hand-off changes no byte."""
    g = torch.Generator().manual_seed(2)
    up = linear(torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g), gelu=True)
    x = torch.randn(37, 64, generator=g)
    for offset in (False, True):
        handed = up.quantized(x, offset)
        assert torch.equal(handed.q, int8_rows.quantize_rows(up(x), offset=offset).q)


def test_switching_encodings_is_the_same_values():
    x = torch.randn(9, 50)
    signed, shifted = int8_rows.quantize_rows(x), int8_rows.quantize_rows(x, offset=True)
    assert torch.equal(_as_quantized(signed, True).q, shifted.q)
    assert torch.equal(_as_quantized(shifted, False).q, signed.q)
    assert isinstance(_as_quantized(x, False), QuantizedRows)


def test_the_torch_glue_can_be_chosen():
    code = "from rerank_kernels import int8_rows; print(int8_rows.missing())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RERANK_INT8_GLUE": "torch"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "RERANK_INT8_GLUE=torch"


@pytest.mark.parametrize("int32", [False, True])
def test_epilogue_layernorm_matches_float64(int32, two_threads):
    g = torch.Generator().manual_seed(4)
    rows, cols = 45, 200
    acc, row_scale, col_scale = gemm_sums(g, rows, cols, int32)
    bias, residual = torch.randn(cols, generator=g), torch.randn(rows, cols, generator=g) * 3
    weight, norm_bias = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    h = reference(acc, row_scale, col_scale, bias, False) + residual.double()
    expected = torch.nn.functional.layer_norm(h, (cols,), weight.double(), norm_bias.double(), 1e-5)
    got, none = int8_rows.epilogue_layernorm(acc.clone(), row_scale, col_scale, bias, residual, weight, norm_bias,
                                             1e-5)
    assert none is None
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # written over the residual (the FFN's case), and quantized for the next GEMM
    into = residual.clone()
    same, q = int8_rows.epilogue_layernorm(acc.clone(), row_scale, col_scale, bias, into, weight, norm_bias, 1e-5,
                                           out=into, quantize=True)
    assert same.data_ptr() == into.data_ptr() and torch.equal(same, got)
    alone = int8_rows.quantize_rows(got, offset=True)
    assert torch.equal(q.q, alone.q) and torch.equal(q.scale, alone.scale)
    # a row's bytes do not depend on the rows beside it
    part, _ = int8_rows.epilogue_layernorm(acc[7:8].clone(), row_scale[7:8], col_scale, bias, residual[7:8], weight,
                                           norm_bias, 1e-5)
    assert torch.equal(part, got[7:8])


@pytest.mark.parametrize("linear", [IntMmLinear, OneDnnInt8Linear])
def test_add_layernorm_in_the_epilogue_equals_the_ops_path(linear):
    from rerank_kernels.layernorm import add_layernorm_inplace
    g = torch.Generator().manual_seed(5)
    lin = linear(torch.randn(48, 64, generator=g) * 0.1, torch.randn(48, generator=g))
    x, residual = torch.randn(30, 64, generator=g), torch.randn(30, 48, generator=g)
    weight, bias = torch.rand(48, generator=g) + 0.5, torch.randn(48, generator=g)
    fused = lin.add_layernorm(x, residual, weight, bias, 1e-5)
    separate = add_layernorm_inplace(lin(x), residual, weight, bias, 1e-5)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
