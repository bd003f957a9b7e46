"""Every Triton kernel under the Triton interpreter (CPU, no GPU) against its PyTorch reference.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, not at launch, and
other test modules may already have imported ``kernels`` (compiled-kernel mode) in this
process. So this module execs private copies of the kernel files with the variable set,
then restores it: the copies hold interpreted kernels, everything else is untouched
(GPU tests in the same run still get compiled kernels). The interpreter has no bf16 and is
slow: shapes are tiny and odd. Also here, still without a GPU: the kernels compile to
cubin for sm_80 and sm_90, and ``kernels`` imports without triton installed.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _load_interpreted(name: str):
    """A private copy of kernels/<name>.py whose @triton.jit kernels are interpreted."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(f"_interpreted_kernels_{name}", ROOT / "kernels" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


attention = _load_interpreted("attention")
embeddings = _load_interpreted("embeddings")
gelu = _load_interpreted("gelu")
layernorm = _load_interpreted("layernorm")

DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16
# (atol, rtol) per dtype. Glue ops: both sides compute in fp32 and round once, so fp16 may
# differ by an ulp. Attention: the kernel feeds fp16 probabilities to the second matmul.
GLUE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}
ATTENTION_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "",
                 show: int = 10) -> None:
    """allclose that, on failure, names the mismatching indices with both values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol) | (a.isnan() != e.isnan())
    if not bad.any():
        return
    idx = bad.nonzero()
    lines = [f"{what}: {len(idx)} of {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
             f"max abs diff {(a - e).abs().nan_to_num(float('inf')).max().item():.3g}"]
    for i in idx[:show].tolist():
        lines.append(f"  at {tuple(i)}: got {a[tuple(i)].item():.6g}, expected {e[tuple(i)].item():.6g}")
    if len(idx) > show:
        lines.append(f"  ... and {len(idx) - show} more")
    pytest.fail("\n".join(lines))


def random_cu_seqlens(seed: int, batch: int = 6, longest: int = 70) -> tuple[torch.Tensor, int]:
    """(batch + 1,) int32 offsets: short sequences, at least two of length 1, one long one."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (batch,), generator=g)
    lengths[0] = lengths[batch // 2] = 1
    lengths[-2] = longest
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return cu, int(lengths.max())


# ----------------------------------------------------------------------------- glue ops

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [48, 80, 1024])
@pytest.mark.parametrize("position_offset", [2, 0])
def test_embed_layernorm(dtype, hidden, position_offset):
    torch.manual_seed(hidden)
    cu, longest = random_cu_seqlens(hidden, longest=70 if hidden < 1024 else 9)
    total, vocab = int(cu[-1]), 97
    ids = torch.randint(0, vocab, (total,))
    word = torch.randn(vocab, hidden).to(dtype)
    position = torch.randn(longest + position_offset + 3, hidden).to(dtype)
    token_type = torch.randn(2, hidden).to(dtype)[0]
    weight, bias = (1 + 0.1 * torch.randn(hidden)).to(dtype), (0.1 * torch.randn(hidden)).to(dtype)
    args = (ids, cu, word, position, token_type, weight, bias, 1e-5, position_offset)
    out = embeddings.embed_layernorm_triton(*args)
    assert out.dtype == dtype
    assert_close(out, embeddings.embed_layernorm_torch(*args), *GLUE_TOL[dtype], what="embed_layernorm")


def test_embed_layernorm_positions_restart_per_sequence():
    """Zero word/type rows and an identity-like position table: the output reveals the ids used."""
    hidden, offset = 16, 2
    cu = torch.tensor([0, 1, 4, 5, 9], dtype=torch.int32)
    position = torch.zeros(16, hidden)
    position[torch.arange(16), torch.arange(16)] = 10.0  # row p has its spike in column p
    zeros = torch.zeros(hidden)
    out = embeddings.embed_layernorm_triton(torch.zeros(9, dtype=torch.long), cu, torch.zeros(3, hidden), position,
                                            zeros, torch.ones(hidden), zeros, 1e-5, offset)
    assert out.argmax(1).tolist() == [2, 2, 3, 4, 2, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 48), (37, 80), (5, 1024)])
def test_add_layernorm(dtype, rows, hidden):
    torch.manual_seed(rows * hidden)
    x = (3 * torch.randn(rows, hidden) + 1).to(dtype)
    residual = torch.randn(rows, hidden).to(dtype)
    weight, bias = (1 + 0.1 * torch.randn(hidden)).to(dtype), (0.1 * torch.randn(hidden)).to(dtype)
    out = layernorm.add_layernorm_triton(x, residual, weight, bias, 1e-5)
    assert out.dtype == dtype
    assert_close(out, layernorm.add_layernorm_torch(x, residual, weight, bias, 1e-5), *GLUE_TOL[dtype],
                 what="add_layernorm")


def test_add_layernorm_strided_rows():
    """A row-sliced residual (e.g. x[rows] views, or a wider buffer) is read by its stride."""
    torch.manual_seed(0)
    wide = torch.randn(7, 96)
    x, residual = torch.randn(7, 48), wide[:, 8:56]
    weight, bias = torch.randn(48), torch.randn(48)
    assert_close(layernorm.add_layernorm_triton(x, residual, weight, bias, 1e-5),
                 layernorm.add_layernorm_torch(x, residual, weight, bias, 1e-5), *GLUE_TOL[torch.float32],
                 what="add_layernorm strided")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,features", [(1, 80), (13, 48), (9, 200)])
def test_bias_gelu(dtype, rows, features):
    torch.manual_seed(rows + features)
    x = (3 * torch.randn(rows, features)).to(dtype)
    bias = torch.randn(features).to(dtype)
    out = gelu.bias_gelu_triton(x, bias)
    assert out.dtype == dtype
    assert_close(out, gelu.bias_gelu_torch(x, bias), *GLUE_TOL[dtype], what="bias_gelu")


def test_glue_ops_accept_empty_batches():
    empty = torch.empty(0, 48)
    assert layernorm.add_layernorm_triton(empty, empty, torch.ones(48), torch.zeros(48), 1e-5).shape == (0, 48)
    assert gelu.bias_gelu_triton(empty, torch.zeros(48)).shape == (0, 48)


# ----------------------------------------------------------------------------- attention

def _attention_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """The reference on fp32 copies: the exact answer for the inputs as given."""
    return attention.varlen_attention_torch(q.float(), k.float(), v.float(), cu_q, cu_k, max_q, max_k, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,head_dim,longest", [(2, 16, 70), (3, 64, 150), (1, 128, 40), (2, 32, 9)])
def test_varlen_attention(dtype, heads, head_dim, longest):
    """Full self-attention: one long sequence spans several query and key blocks."""
    torch.manual_seed(head_dim + longest)
    cu, max_len = random_cu_seqlens(head_dim, longest=longest)
    total = int(cu[-1])
    # Q, K and V as views into one fused (total, 3, heads, dim) tensor, as the model passes them.
    qkv = torch.randn(total, 3, heads, head_dim).to(dtype)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    scale = head_dim ** -0.5
    out = attention.varlen_attention_triton(q, k, v, cu, cu, max_len, max_len, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, _attention_reference(q, k, v, cu, cu, max_len, max_len, scale), *ATTENTION_TOL[dtype],
                 what=f"varlen_attention {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_attention_first_token_queries(dtype):
    """The last layer: one query per sequence (cu_seqlens_q = arange) against all its keys."""
    torch.manual_seed(1)
    heads, head_dim = 2, 64
    cu_k, max_k = random_cu_seqlens(7, batch=5, longest=90)
    batch, total = cu_k.shape[0] - 1, int(cu_k[-1])
    kv = torch.randn(total, 2, heads, head_dim).to(dtype)
    q = torch.randn(batch, heads, head_dim).to(dtype)
    cu_q = torch.arange(batch + 1, dtype=torch.int32)
    args = (q, kv[:, 0], kv[:, 1], cu_q, cu_k, 1, max_k, head_dim ** -0.5)
    assert_close(attention.varlen_attention_triton(*args), _attention_reference(*args), *ATTENTION_TOL[dtype],
                 what="first-token attention")


def test_varlen_attention_different_query_and_key_lengths():
    """cu_seqlens_q and cu_seqlens_k are independent, an empty query range included."""
    torch.manual_seed(2)
    heads, head_dim = 2, 16
    q_lens, k_lens = [3, 0, 1, 20, 2], [5, 4, 1, 3, 70]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, head_dim)
    k, v = torch.randn(sum(k_lens), heads, head_dim), torch.randn(sum(k_lens), heads, head_dim)
    args = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 0.3)
    assert_close(attention.varlen_attention_triton(*args), _attention_reference(*args),
                 *ATTENTION_TOL[torch.float32], what="q/k lengths differ")


def test_varlen_attention_rejects_bad_head_dim():
    x = torch.randn(4, 1, 24)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        attention.varlen_attention_triton(x, x, x, cu, cu, 4, 4, 1.0)


# ----------------------------------------------------------------------------- without a GPU or triton

def _cuda_signature(kernel, dtype: str) -> dict[str, str]:
    """A compile signature from the kernel's parameter names (the kernels follow one naming rule)."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name == "ids_ptr":
            sig[p.name] = "*i64"
        elif p.name.startswith("cu_seqlens"):
            sig[p.name] = "*i32"
        elif p.name.endswith("_ptr"):
            sig[p.name] = f"*{dtype}"
        else:
            sig[p.name] = "fp32" if p.name in ("eps", "qk_scale") else "i32"
    return sig


def test_kernels_compile_for_cuda():
    """The compiled (non-interpreted) kernels lower to cubin for A100 and H100 with the
    wheel's ptxas, so the GPU path's Triton code is at least valid Triton without a GPU."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no CUDA backend: {e}")
    import kernels.attention as a
    import kernels.embeddings as e
    import kernels.gelu as g
    import kernels.layernorm as n
    cases = [(e._embed_layernorm_kernel, {"BLOCK_H": 1024}, 4), (n._add_layernorm_kernel, {"BLOCK_H": 1024}, 4),
             (g._bias_gelu_kernel, {"BLOCK": 1024}, 4),
             (a._varlen_attention_kernel, {"HEAD_DIM": 64, "BLOCK_M": 16, "BLOCK_N": 64, "IEEE": False}, 4),
             (a._varlen_attention_kernel, {"HEAD_DIM": 64, "BLOCK_M": 128, "BLOCK_N": 64, "IEEE": False}, 8)]
    for capability, dtype in ((80, "bf16"), (90, "fp16")):
        for kernel, constexprs, num_warps in cases:
            if not isinstance(kernel, triton.runtime.JITFunction):
                pytest.skip("kernels were decorated in interpreter mode (TRITON_INTERPRET=1 for the whole run)")
            compiled = triton.compile(ASTSource(kernel, _cuda_signature(kernel, dtype), constexprs=constexprs),
                                      target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": num_warps, "num_stages": 2})
            assert compiled.asm["cubin"], f"{kernel.__name__} sm_{capability}: no cubin"


def test_kernels_import_without_triton():
    """The CPU install has no triton: ``kernels`` imports, the CPU ops work, a Triton op says why not."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kernels\n"
        "from kernels.gelu import bias_gelu_triton\n"
        "ops = kernels.select_ops(torch.device('cpu'))\n"
        "assert ops.attention_backend == 'torch-sdpa', ops\n"
        "assert kernels.available_attention_backends('cpu') == ['torch-sdpa']\n"
        "try:\n"
        "    bias_gelu_triton(torch.ones(2, 2), torch.ones(2))\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_select_ops_on_cpu():
    from kernels import ATTENTION_BACKENDS, TORCH_OPS, select_ops
    cpu = torch.device("cpu")
    assert select_ops(cpu) is TORCH_OPS and select_ops(cpu, "torch-sdpa") is TORCH_OPS
    for name in ATTENTION_BACKENDS[:-1]:
        with pytest.raises(ValueError, match="needs CUDA"):
            select_ops(cpu, name)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        select_ops(cpu, "flash")
