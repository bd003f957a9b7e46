"""Every launch configuration the load-time measurement may pick for the Triton varlen
attention (wider key blocks, more stages, the unmasked main loop with a masked tail), under
the Triton interpreter against the PyTorch reference: key lengths below one block, exact
multiples of it and one past, each query tier (first-token queries, <= 64, longer).
The default configuration is covered by test_kernels_interpreter.py."""
from __future__ import annotations

import pytest
import torch
from tensor_checks import assert_close, run_interpreted

from rerank_kernels import attention  # the reference; the kernel runs in the child

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3)}


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def self_attention(head_dim: int, lengths: list[int], dtype: torch.dtype, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, 2, head_dim, generator=g).to(dtype)  # views into a fused QKV
    return (qkv[:, 0], qkv[:, 1], qkv[:, 2], cu(lengths), cu(lengths), max(lengths), max(lengths), head_dim ** -0.5)


def first_token_queries(head_dim: int, lengths: list[int], dtype: torch.dtype, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(sum(lengths), 2, 2, head_dim, generator=g).to(dtype)
    q = torch.randn(len(lengths), 2, head_dim, generator=g).to(dtype)
    return (q, kv[:, 0], kv[:, 1], torch.arange(len(lengths) + 1, dtype=torch.int32), cu(lengths), 1,
            max(lengths), head_dim ** -0.5)


# Key lengths around the block widths (32, 64, 128): shorter than a block, exact multiples, one past.
LONG = [1, 63, 64, 65, 128, 129, 150]
SHORT = [1, 17, 40, 64, 33]
CASES: dict[str, tuple] = {}  # name -> (args, configs)
for head_dim in (32, 128):
    for name, config in attention.attention_config_candidates(head_dim, 128).items():
        for dtype in (torch.float16, torch.float32) if head_dim == 32 else (torch.float16,):
            tag = f"d{head_dim}-{name}-{str(dtype).removeprefix('torch.')}"
            tiers = {16: config, 64: config, 128: config}
            CASES[f"{tag}-long"] = (self_attention(head_dim, LONG, dtype, 1), tiers)
            if dtype == torch.float16 and head_dim == 32:
                CASES[f"{tag}-short"] = (self_attention(head_dim, SHORT, dtype, 2), tiers)
            if dtype == torch.float16:
                CASES[f"{tag}-first-token"] = (first_token_queries(head_dim, LONG, dtype, 3), tiers)

_WORKER = """
import sys, traceback
import torch
from rerank_kernels.attention import varlen_attention_triton
cases = torch.load(sys.argv[1], weights_only=False)
results = {}
for name, (args, configs) in cases.items():
    try:
        results[name] = varlen_attention_triton(*args, configs=configs)
    except Exception as e:
        results[name] = "".join(traceback.format_exception_only(e)).strip()
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("attention_configs")
    torch.save(CASES, tmp / "cases.pt")
    run_interpreted(_WORKER, tmp / "cases.pt", tmp / "out.pt")
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_attention_config_in_interpreter(name, interpreted):
    args, _ = CASES[name]
    out = interpreted[name]
    if isinstance(out, str):
        pytest.fail(f"varlen_attention_triton raised in the interpreter: {out}")
    q, k, v, *rest = args
    expected = attention.varlen_attention_torch(q.float(), k.float(), v.float(), *rest)
    assert_close(out, expected, *TOL[q.dtype], what=name)


def test_candidates_differ_from_the_default():
    """Each candidate changes something the default does not do (else measuring it is waste)."""
    for head_dim in (32, 64, 128):
        for block_m in (16, 64, 128):
            default = attention.attention_config(head_dim, block_m)
            candidates = attention.attention_config_candidates(head_dim, block_m)
            assert candidates and all(c != default and c["UNMASKED_MAIN"] for c in candidates.values())
            assert all(c["num_warps"] == default["num_warps"] for c in candidates.values())
            assert max(c["BLOCK_N"] for c in candidates.values()) == 2 * default["BLOCK_N"]


def test_unmasked_config_compiles_for_hopper():
    """The widest candidate (128-key blocks, 3 stages, unmasked main loop + masked tail)
    lowers to cubin for sm_90 with the wheel's ptxas (the interpreter is more lenient)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no CUDA backend: {e}")
    kernel = attention._varlen_attention_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        pytest.skip("kernels were decorated in interpreter mode (TRITON_INTERPRET=1 for the whole run)")
    config = attention.attention_config_candidates(64, 128)["n128-s3-unmasked"]
    signature = {p.name: "constexpr" if p.is_constexpr else
                 ("*i32" if p.name.startswith("cu_seqlens") else "*fp16" if p.name.endswith("_ptr") else
                  "fp32" if p.name == "qk_scale" else "i32") for p in kernel.params}
    constexprs = {"HEADS": 16, "HEAD_DIM": 64, "BLOCK_M": 128, "BLOCK_N": config["BLOCK_N"], "IEEE": False,
                  "UNMASKED_MAIN": True}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config["num_warps"], "num_stages": config["num_stages"],
                                       "enable_fp_fusion": True})
    assert compiled.asm["cubin"]
