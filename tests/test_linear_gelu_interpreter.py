"""The fused FFN kernels under the Triton interpreter, against their PyTorch references:
up-projection + bias + erf-GELU (fp32 and fp16, odd shapes, every autotuning config once),
and add+LayerNorm written straight into a slice of its residual; plus (no GPU needed) the
up-projection's lowering to cubin for sm_80 and sm_90.

As in test_kernels_interpreter.py, ``TRITON_INTERPRET=1`` must be set before triton is
imported, so all cases run in one child process and come back through ``torch.save``.
"""
from __future__ import annotations

import pytest
import torch
from tensor_checks import assert_close, run_interpreted

from rerank_kernels import layernorm, linear_gelu  # references; the kernels run in the child

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

# Both sides accumulate in fp32 and round once; fp16 may differ by an ulp of the output.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3)}


def _inputs(rows: int, features_in: int, features_out: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(rows, features_in, generator=g)
    weight = torch.randn(features_out, features_in, generator=g) / features_in ** 0.5
    bias = torch.randn(features_out, generator=g)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


CASES: dict[str, tuple] = {}  # name -> (args, kwargs) of linear_gelu_triton, or of add_layernorm_triton
for dtype in (torch.float32, torch.float16):
    name = str(dtype).removeprefix("torch.")
    # (rows, in, out): one row; ragged K (20, 33: the masked main loop) and even K; output
    # tiles cut in both directions; more row blocks than GROUP_M (the grouped order's tail).
    for rows, k, n in ((1, 20, 40), (37, 48, 72), (5, 64, 130), (19, 33, 47), (70, 16, 33)):
        CASES[f"{name}-{rows}x{k}->{n}"] = (_inputs(rows, k, n, dtype, rows * k + n), {})
    # Every tile the autotuner may pick on a GPU, each once, on one odd shape.
    for i, config in enumerate(linear_gelu.AUTOTUNE_CONFIGS):
        if dtype == torch.float16 or i == 0:
            CASES[f"{name}-config{i}-70x136->300"] = (_inputs(70, 136, 300, dtype, i), {"config": config})
# Rows read by their stride (a view into a wider buffer), as the model's FFN slices may be.
_x, _w, _b = _inputs(7, 96, 40, torch.float32, 0)
CASES["float32-strided-rows"] = ((_x[:, 8:56], _w[:, :48].contiguous(), _b), {})
# The autotuned launch itself (key, pruning per row tier, heuristics), its timer faked in the child.
for rows in (5, 200, 700):
    CASES[f"autotuned-{rows}x64->130"] = (_inputs(rows, 64, 130, torch.float16, rows), {})
CASES["empty"] = ((torch.empty(0, 48), torch.ones(40, 48), torch.zeros(40)), {})
CASES["shapes-do-not-fit"] = ((torch.ones(3, 48), torch.ones(40, 47), torch.zeros(40)), {})

# The model's FFN slice: LayerNorm(down + rows) written over ``rows`` itself, a row slice of
# the (total, hidden) activation; the rows around it must stay as they were.
for dtype in (torch.float32, torch.float16):
    g = torch.Generator().manual_seed(5)
    buffer = torch.randn(12, 80, generator=g).to(dtype)
    rows = buffer[2:9]
    CASES[f"add_layernorm-into-residual-{str(dtype).removeprefix('torch.')}"] = (
        ((3 * torch.randn(7, 80, generator=g)).to(dtype), rows, (1 + 0.1 * torch.randn(80, generator=g)).to(dtype),
         (0.1 * torch.randn(80, generator=g)).to(dtype), 1e-5), {"out": rows})
CASES["add_layernorm-out-wrong-shape"] = (
    (torch.ones(3, 48), torch.ones(3, 48), torch.ones(48), torch.zeros(48), 1e-5), {"out": torch.empty(3, 40)})

_WORKER = """
import sys, traceback
import torch
import rerank_kernels.linear_gelu as linear_gelu
from rerank_kernels.layernorm import add_layernorm_triton
from rerank_kernels.linear_gelu import linear_gelu_triton
cases = torch.load(sys.argv[1], weights_only=False)
benched = []

def fake_do_bench(kernel_call, quantiles):  # each config runs once; the first one benched wins
    kernel_call()
    benched.append(1)
    return [float(len(benched))] * 3

linear_gelu._linear_gelu_autotuned._do_bench = fake_do_bench
results = {}
for name, (args, kwargs) in cases.items():
    function = add_layernorm_triton if name.startswith("add_layernorm") else linear_gelu_triton
    autotuned = name.startswith("autotuned")
    linear_gelu._interpreting = lambda: not autotuned  # autotuned: the launch a GPU takes
    benched.clear()
    try:
        results[name] = (function(*args, **kwargs), args)  # args too: out= writes into one of them
        if autotuned:
            results[name + ":tuning"] = (len(benched), linear_gelu.tuned_config(args[0], args[1]))
    except Exception as e:
        results[name] = "".join(traceback.format_exception_only(e)).strip()
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Case name -> (the kernel's output, its args after the call) or its error text, all run
    in one interpreter child."""
    tmp = tmp_path_factory.mktemp("linear_gelu")
    torch.save(CASES, tmp / "cases.pt")
    run_interpreted(_WORKER, tmp / "cases.pt", tmp / "out.pt")
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(("shapes", "add_layernorm"))])
def test_linear_gelu_in_interpreter(name, interpreted):
    (x, weight, bias), _ = CASES[name]
    if isinstance(interpreted[name], str):
        pytest.fail(f"linear_gelu_triton raised in the interpreter: {interpreted[name]}")
    out, _ = interpreted[name]
    assert out.dtype == x.dtype and out.is_contiguous()
    assert_close(out, linear_gelu.linear_gelu_torch(x, weight, bias), *TOL[x.dtype], what=name)


@pytest.mark.parametrize("rows,block_m_range", [(5, (16, 64)), (200, (32, 128)), (700, (64, 256))])
def test_autotuning_benches_the_tiles_of_the_row_tier(rows, block_m_range, interpreted):
    """Each row tier benchmarks only the tiles sized for it (the pruning), and the autotuner's
    pick is what the load-time report shows."""
    name = f"autotuned-{rows}x64->130"
    assert not isinstance(interpreted[name], str), interpreted[name]
    benched, config = interpreted[name + ":tuning"]
    tiles = [c for c in linear_gelu.AUTOTUNE_CONFIGS if block_m_range[0] <= c["BLOCK_M"] <= block_m_range[1]]
    assert benched == len(tiles) >= 3, (benched, len(tiles))
    first = tiles[0]  # the fake timer makes the first benched config the fastest
    assert config.startswith(f"BLOCK_M: {first['BLOCK_M']}, BLOCK_N: {first['BLOCK_N']}, "
                             f"BLOCK_K: {first['BLOCK_K']}, GROUP_M: 8"), config


def test_linear_gelu_rejects_shapes_that_do_not_fit(interpreted):
    out = interpreted["shapes-do-not-fit"]
    assert isinstance(out, str) and "ValueError" in out and "(3, 48)" in out and "(40, 47)" in out, out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_add_layernorm_writes_into_its_residual_slice(dtype, interpreted):
    name = f"add_layernorm-into-residual-{dtype}"
    (x, residual, weight, bias, eps), _ = CASES[name]
    if isinstance(interpreted[name], str):
        pytest.fail(f"add_layernorm_triton raised in the interpreter: {interpreted[name]}")
    out, (_, rows_after, *_) = interpreted[name]
    buffer_before = residual._base
    # torch.load rebuilds views on the shared storage (without _base): read the whole buffer from it
    buffer_after = rows_after.new_empty(0).set_(rows_after.untyped_storage(), 0, buffer_before.shape)
    assert out.data_ptr() == rows_after.data_ptr() and out.stride() == residual.stride(), "not written in place"
    expected = layernorm.add_layernorm_torch(x, residual, weight, bias, eps)
    assert_close(buffer_after[2:9], expected, *TOL[x.dtype], what=name)
    assert torch.equal(buffer_after[:2], buffer_before[:2]) and torch.equal(buffer_after[9:], buffer_before[9:])


def test_add_layernorm_out_must_fit(interpreted):
    out = interpreted["add_layernorm-out-wrong-shape"]
    assert isinstance(out, str) and "ValueError" in out and "(3, 40)" in out, out


@pytest.mark.parametrize("function", [layernorm.add_layernorm_torch, layernorm.add_layernorm_inplace])
def test_cpu_add_layernorm_out(function):
    """The CPU ops take the same ``out=`` (the model passes it on every device)."""
    g = torch.Generator().manual_seed(1)
    x, buffer = torch.randn(5, 48, generator=g), torch.randn(9, 48, generator=g)
    weight, bias = torch.randn(48, generator=g), torch.randn(48, generator=g)
    expected = layernorm.add_layernorm_torch(x, buffer[2:7], weight, bias, 1e-5)
    before = buffer.clone()
    out = function(x.clone(), buffer[2:7], weight, bias, 1e-5, out=buffer[2:7])
    assert out.data_ptr() == buffer[2:7].data_ptr()
    assert_close(buffer[2:7], expected, *TOL[torch.float32], what=function.__name__)
    assert torch.equal(buffer[:2], before[:2]) and torch.equal(buffer[7:], before[7:])


def test_unfused_baseline_matches_the_reference():
    """The baseline the selection times against is the same op (CPU: MKL GEMM + reference GELU)."""
    x, weight, bias = _inputs(9, 40, 56, torch.float32, 3)
    assert_close(linear_gelu.linear_gelu_unfused(x, weight, bias), linear_gelu.linear_gelu_torch(x, weight, bias),
                 *TOL[torch.float32], what="unfused")


def test_rows_buckets():
    """Few tiers, so a new batch size never re-tunes; the last layer's rows fall in the first."""
    assert [linear_gelu.rows_bucket(r) for r in (1, 64, 65, 512, 513, 4096)] == [64, 64, 512, 512, 2 ** 30, 2 ** 30]


def test_linear_gelu_compiles_for_hopper_and_ampere():
    """The compiled kernel lowers to cubin with the wheel's ptxas: the largest tile on sm_90
    uses wgmma and fits its shared memory (227 KB) with 3 stages, and a few-row tile on sm_80."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no CUDA backend: {e}")
    kernel = linear_gelu._linear_gelu_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        pytest.skip("kernels were decorated in interpreter mode (TRITON_INTERPRET=1 for the whole run)")
    names = [p.name for p in kernel.params]
    signature = {p.name: "constexpr" if p.is_constexpr else ("*fp16" if p.name.endswith("_ptr") else "i32")
                 for p in kernel.params}
    # What the JIT assumes at a real launch: 16-byte aligned tensors, the model's dims multiples of 16.
    aligned = {(names.index(n),): [["tt.divisibility", 16]]
               for n in ("x_ptr", "w_ptr", "bias_ptr", "out_ptr", "N", "K", "x_stride", "w_stride", "out_stride")}
    for capability, config in ((90, linear_gelu.AUTOTUNE_CONFIGS[0]), (80, linear_gelu.AUTOTUNE_CONFIGS[-2])):
        constexprs = {k: v for k, v in config.items() if k.isupper()} | {"EVEN_K": True, "IEEE": False}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned),
                                  target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": config["num_warps"], "num_stages": config["num_stages"],
                                           "enable_fp_fusion": True})
        assert compiled.asm["cubin"], f"sm_{capability}: no cubin"
        if capability == 90:
            assert "wgmma" in compiled.asm["ptx"], "sm_90: the main loop does not use wgmma"
            assert compiled.metadata.shared <= 227 * 1024, compiled.metadata.shared
