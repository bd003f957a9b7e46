"""Every Triton kernel under the Triton interpreter (CPU, no GPU) against its PyTorch reference.

``TRITON_INTERPRET=1`` only takes effect if it is set before ``import triton``: it is read
when ``@triton.jit`` decorates a function, and triton's own library functions (``tl.sum``,
``tl.max``, ...) are decorated at import. Other test modules in this process may already
have imported triton in compiled mode (and the GPU tests need it so), so the kernels run in
one child process started with the variable set: the parent builds every case's inputs,
the child runs them all and hands the outputs back through ``torch.save`` (which keeps
views and strides), and each test compares its output with the reference here.
The interpreter has no bf16 and is slow: shapes are tiny and odd. Also here, still
without a GPU: the kernels compile to cubin for sm_80 and sm_90, and ``kernels`` imports
without triton installed.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensor_checks import assert_close, run_interpreted

import rerank_kernels.attention as attention  # references; the Triton ops run in the child
import rerank_kernels.embeddings as embeddings
import rerank_kernels.gelu as gelu
import rerank_kernels.layernorm as layernorm

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16
# (atol, rtol) per dtype. Glue ops: both sides compute in fp32 and round once, so fp16 may
# differ by an ulp. Attention: the kernel feeds fp16 probabilities to the second matmul.
GLUE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}
ATTENTION_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3)}


def random_cu_seqlens(seed: int, batch: int = 6, longest: int = 70) -> tuple[torch.Tensor, int]:
    """(batch + 1,) int32 offsets: short sequences, at least two of length 1, one long one."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (batch,), generator=g)
    lengths[0] = lengths[batch // 2] = 1
    lengths[-2] = longest
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return cu, int(lengths.max())


def cu_from_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One call of ``kernels.<module>.<function>_triton(*args)`` in the interpreter."""

    module: str
    function: str
    args: tuple
    reference: Callable | None = None  # same args -> expected tensor
    tol: tuple[float, float] = (0.0, 0.0)
    error: str | None = None  # expected exception text instead of an output
    check: Callable | None = None  # extra assertion on the output


CASES: dict[str, Case] = {}


def _attention_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """The reference on fp32 copies: the exact answer for the inputs as given."""
    return attention.varlen_attention_torch(q.float(), k.float(), v.float(), cu_q, cu_k, max_q, max_k, scale)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


for dtype in DTYPES:
    for hidden in (48, 80, 1024):
        # RoBERTa (positions from 2, every token type 0) and BERT (positions from 0, per-token types)
        for offset, with_types in ((2, False), (0, True)):
            torch.manual_seed(hidden + offset)
            cu, longest = random_cu_seqlens(hidden, longest=70 if hidden < 1024 else 9)
            vocab, total = 97, int(cu[-1])
            CASES[f"embed-{_dtype_name(dtype)}-h{hidden}-offset{offset}{'-types' if with_types else ''}"] = Case(
                "embeddings", "embed_layernorm_triton",
                (torch.randint(0, vocab, (total,)), cu, torch.randn(vocab, hidden).to(dtype),
                 torch.randn(longest + offset + 3, hidden).to(dtype), torch.randn(2, hidden).to(dtype),
                 (1 + 0.1 * torch.randn(hidden)).to(dtype), (0.1 * torch.randn(hidden)).to(dtype), 1e-5, offset,
                 torch.randint(0, 2, (total,)) if with_types else None),
                embeddings.embed_layernorm_torch, GLUE_TOL[dtype])

    for rows, hidden in ((1, 48), (37, 80), (5, 1024)):
        torch.manual_seed(rows * hidden)
        CASES[f"add_layernorm-{_dtype_name(dtype)}-{rows}x{hidden}"] = Case(
            "layernorm", "add_layernorm_triton",
            ((3 * torch.randn(rows, hidden) + 1).to(dtype), torch.randn(rows, hidden).to(dtype),
             (1 + 0.1 * torch.randn(hidden)).to(dtype), (0.1 * torch.randn(hidden)).to(dtype), 1e-5),
            layernorm.add_layernorm_torch, GLUE_TOL[dtype])

    for rows, features in ((1, 80), (13, 48), (9, 200)):
        torch.manual_seed(rows + features)
        CASES[f"bias_gelu-{_dtype_name(dtype)}-{rows}x{features}"] = Case(
            "gelu", "bias_gelu_triton", ((3 * torch.randn(rows, features)).to(dtype), torch.randn(features).to(dtype)),
            gelu.bias_gelu_torch, GLUE_TOL[dtype])

    # Full self-attention; the long sequence spans several query and key blocks (150: two
    # 128-row query blocks, three 64-key blocks). Q, K and V are views into one fused
    # (total, 3, heads, dim) tensor, as the model passes them.
    for heads, head_dim, longest in ((2, 16, 70), (3, 64, 150), (1, 128, 40), (2, 32, 9)):
        torch.manual_seed(head_dim + longest)
        cu, max_len = random_cu_seqlens(head_dim, longest=longest)
        qkv = torch.randn(int(cu[-1]), 3, heads, head_dim).to(dtype)
        CASES[f"attention-{_dtype_name(dtype)}-h{heads}-d{head_dim}-longest{longest}"] = Case(
            "attention", "varlen_attention_triton",
            (qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max_len, max_len, head_dim ** -0.5),
            _attention_reference, ATTENTION_TOL[dtype])

    # The last layer: one query per sequence (cu_seqlens_q = arange) against all its keys.
    torch.manual_seed(1)
    cu_k, max_k = random_cu_seqlens(7, batch=5, longest=90)
    kv = torch.randn(int(cu_k[-1]), 2, 2, 64).to(dtype)
    CASES[f"attention-{_dtype_name(dtype)}-first-token-queries"] = Case(
        "attention", "varlen_attention_triton",
        (torch.randn(5, 2, 64).to(dtype), kv[:, 0], kv[:, 1], torch.arange(6, dtype=torch.int32), cu_k, 1, max_k,
         0.125),
        _attention_reference, ATTENTION_TOL[dtype])

# cu_seqlens_q and cu_seqlens_k are independent, an empty query range included.
torch.manual_seed(2)
CASES["attention-float32-q-and-k-lengths-differ"] = Case(
    "attention", "varlen_attention_triton",
    (torch.randn(26, 2, 16), torch.randn(83, 2, 16), torch.randn(83, 2, 16),
     cu_from_lengths([3, 0, 1, 20, 2]), cu_from_lengths([5, 4, 1, 3, 70]), 20, 70, 0.3),
    _attention_reference, ATTENTION_TOL[torch.float32])
CASES["attention-rejects-head-dim-24"] = Case(
    "attention", "varlen_attention_triton",
    (torch.randn(4, 1, 24), torch.randn(4, 1, 24), torch.randn(4, 1, 24), cu_from_lengths([4]), cu_from_lengths([4]),
     4, 4, 1.0), error="power-of-two head_dim")

# A row-sliced residual (a view into a wider buffer) is read by its stride.
torch.manual_seed(0)
CASES["add_layernorm-float32-strided-residual"] = Case(
    "layernorm", "add_layernorm_triton",
    (torch.randn(7, 48), torch.randn(7, 96)[:, 8:56], torch.randn(48), torch.randn(48), 1e-5),
    layernorm.add_layernorm_torch, GLUE_TOL[torch.float32])
CASES["add_layernorm-empty"] = Case(
    "layernorm", "add_layernorm_triton",
    (torch.empty(0, 48), torch.empty(0, 48), torch.ones(48), torch.zeros(48), 1e-5),
    layernorm.add_layernorm_torch)
CASES["bias_gelu-empty"] = Case("gelu", "bias_gelu_triton", (torch.empty(0, 48), torch.zeros(48)), gelu.bias_gelu_torch)


def _spikes(hidden: int = 16) -> torch.Tensor:
    position = torch.zeros(hidden, hidden)
    position[torch.arange(hidden), torch.arange(hidden)] = 10.0  # row p has its spike in column p
    return position


# Positions restart at the offset in every sequence: zero word and type rows and a spiky
# position table make the output reveal the position ids the kernel used.
CASES["embed-positions-restart-per-sequence"] = Case(
    "embeddings", "embed_layernorm_triton",
    (torch.zeros(9, dtype=torch.long), cu_from_lengths([1, 3, 1, 4]), torch.zeros(3, 16), _spikes(),
     torch.zeros(1, 16), torch.ones(16), torch.zeros(16), 1e-5, 2),
    embeddings.embed_layernorm_torch, GLUE_TOL[torch.float32],
    check=lambda out: out.argmax(1).tolist() == [2, 2, 3, 4, 2, 2, 3, 4, 5])
# Each token's type row is added (BERT: query 0, document 1): zero word and position rows and
# a spiky three-row type table make the output reveal the type ids the kernel used.
_TYPE_IDS = [0, 0, 1, 1, 2, 0, 1, 0, 1]
CASES["embed-token-type-per-token"] = Case(
    "embeddings", "embed_layernorm_triton",
    (torch.zeros(9, dtype=torch.long), cu_from_lengths([4, 1, 4]), torch.zeros(3, 16), torch.zeros(8, 16),
     _spikes()[5:8], torch.ones(16), torch.zeros(16), 1e-12, 0, torch.tensor(_TYPE_IDS, dtype=torch.int32)),
    embeddings.embed_layernorm_torch, GLUE_TOL[torch.float32],
    check=lambda out: out.argmax(1).tolist() == [5 + t for t in _TYPE_IDS])

_WORKER = """
import importlib, sys, traceback
import torch
cases = torch.load(sys.argv[1], weights_only=False)
results = {}
for name, (module, function, args) in cases.items():
    try:
        results[name] = getattr(importlib.import_module("rerank_kernels." + module), function)(*args)
    except Exception as e:
        results[name] = "".join(traceback.format_exception_only(e)).strip()
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Case name -> the kernel's output (or its error text), all run in one interpreter child."""
    tmp = tmp_path_factory.mktemp("interpreter")
    torch.save({name: (c.module, c.function, c.args) for name, c in CASES.items()}, tmp / "cases.pt")
    run_interpreted(_WORKER, tmp / "cases.pt", tmp / "out.pt")
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_in_interpreter(name, interpreted):
    case, out = CASES[name], interpreted[name]
    if case.error is not None:
        assert isinstance(out, str) and case.error in out, f"expected an error with {case.error!r}, got {out!r}"
        return
    if isinstance(out, str):
        pytest.fail(f"{case.module}.{case.function} raised in the interpreter: {out}")
    expected = case.reference(*case.args)
    assert out.dtype == case.args[2 if case.module == "embeddings" else 0].dtype
    assert_close(out, expected, *case.tol, what=name)
    if case.check is not None:
        assert case.check(out), f"{name}: extra check failed on {out}"


# ----------------------------------------------------------------------------- without a GPU or triton

def _cuda_signature(kernel, dtype: str) -> dict[str, str]:
    """A compile signature from the kernel's parameter names (the kernels follow one naming rule)."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("ids_ptr"):
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
    import rerank_kernels.attention as a
    import rerank_kernels.embeddings as e
    import rerank_kernels.gelu as g
    import rerank_kernels.layernorm as n
    cases = [(e._embed_layernorm_kernel, {"BLOCK_H": 1024, "HAS_TYPE_IDS": True}, 4),
             (n._add_layernorm_kernel, {"BLOCK_H": 1024}, 4),
             (g._bias_gelu_kernel, {"BLOCK": 1024}, 4),
             (a._varlen_attention_kernel,
              {"HEADS": 16, "HEAD_DIM": 64, "BLOCK_M": 16, "BLOCK_N": 64, "IEEE": False}, 4),
             (a._varlen_attention_kernel,
              {"HEADS": 16, "HEAD_DIM": 64, "BLOCK_M": 128, "BLOCK_N": 64, "IEEE": False}, 8)]
    for capability, dtype in ((80, "bf16"), (90, "fp16")):
        for kernel, constexprs, num_warps in cases:
            if not isinstance(kernel, triton.runtime.JITFunction):
                pytest.skip("kernels were decorated in interpreter mode (TRITON_INTERPRET=1 for the whole run)")
            compiled = triton.compile(ASTSource(kernel, _cuda_signature(kernel, dtype), constexprs=constexprs),
                                      target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": num_warps, "num_stages": 2, "enable_fp_fusion": True})
            assert compiled.asm["cubin"], f"{kernel.__name__} sm_{capability}: no cubin"


def test_kernels_import_without_triton():
    """The CPU install has no triton: ``kernels`` imports, the CPU ops work, a Triton op says why not."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, rerank_kernels\n"
        "from rerank_kernels.gelu import bias_gelu_triton\n"
        "ops = rerank_kernels.select_ops(torch.device('cpu'))\n"
        "assert ops.attention_backend == 'torch-sdpa', ops\n"
        "assert rerank_kernels.available_attention_backends('cpu') == ['torch-sdpa']\n"
        "try:\n"
        "    bias_gelu_triton(torch.ones(2, 2), torch.ones(2))\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_select_ops_on_cpu():
    from rerank_kernels import ATTENTION_BACKENDS, TORCH_OPS, select_ops
    cpu = torch.device("cpu")
    assert select_ops(cpu) is TORCH_OPS and select_ops(cpu, "torch-sdpa") is TORCH_OPS
    for name in ATTENTION_BACKENDS[:-1]:
        with pytest.raises(ValueError, match="needs CUDA"):
            select_ops(cpu, name)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        select_ops(cpu, "flash")


@pytest.mark.parametrize("flash_attn_installed", [True, False])
def test_select_ops_on_a_simulated_cuda_machine(monkeypatch, flash_attn_installed):
    """The CUDA preference order and error messages, with CUDA and the libraries faked
    (nothing is launched): flash-attn > torch-varlen > triton, fp32 and pre-Ampere rule
    out the FlashAttention backends, the glue ops are the Triton kernels."""
    import rerank_kernels
    import rerank_kernels.attention as dispatch
    from rerank_kernels.embeddings import embed_layernorm_triton

    def fake_flash(*args, **kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch, "_flash_attn_varlen_func",
                        lambda: fake_flash if flash_attn_installed else "the flash-attn package does not import")
    monkeypatch.setattr(dispatch, "_torch_varlen_attn", lambda: fake_flash)
    cuda = torch.device("cuda")
    best = ["flash-attn"] if flash_attn_installed else []
    assert rerank_kernels.available_attention_backends() == [*best, "torch-varlen", "triton", "torch-sdpa"]
    ops = rerank_kernels.select_ops(cuda)
    assert ops.attention_backend == (best + ["torch-varlen"])[0]
    assert ops.embed_layernorm is embed_layernorm_triton
    assert rerank_kernels.select_ops(cuda, "triton").varlen_attention is dispatch.varlen_attention_triton
    assert rerank_kernels.select_ops(cuda, "torch-sdpa").varlen_attention is dispatch.varlen_attention_torch
    if not flash_attn_installed:
        with pytest.raises(ValueError, match="'flash-attn' is unavailable on cuda: the flash-attn package does not"):
            rerank_kernels.select_ops(cuda, "flash-attn")
    assert rerank_kernels.select_ops(cuda, dtype=torch.float32).attention_backend == "triton"
    with pytest.raises(ValueError, match="fp16/bf16 only"):
        rerank_kernels.select_ops(cuda, "torch-varlen", dtype=torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert rerank_kernels.available_attention_backends(cuda) == ["triton", "torch-sdpa"]
    with pytest.raises(ValueError, match="compute capability 8.0"):
        rerank_kernels.select_ops(cuda, "torch-varlen")


# ----------------------------------------------------------------------------- the whole model

# head_dim 32 (the Triton attention needs a power of two >= 16); a 300-piece vocabulary.
TINY_MODEL = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128,
                  vocab_size=300, max_position_embeddings=160)
# Random lengths with two of length 1, spanning the attention's query tiers (<= 16, <= 64, longer).
MODEL_LENGTHS = [1, 9, 70, 1, 33, 4, 17, 2, 90, 12]

_MODEL_WORKER = """
import sys
from dataclasses import replace
from pathlib import Path
import torch
from rerank_kernels import triton_ops
from rerank_kernels.linear_gelu import linear_gelu_triton
from rerank_server.models.encoder import load_cross_encoder
checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
ids, cu_seqlens, max_seqlen = torch.load(checkpoint / "batch.pt")
# the CUDA op set as selected at load: the FFN up-projection unfused (GEMM + bias_gelu) or
# fused (fp32 only: the interpreted fused matmul is slow; its fp16 has its own kernel test)
fused = replace(triton_ops(), measured_linear_gelu=linear_gelu_triton)
runs = [("unfused", triton_ops(), torch.float32), ("unfused", triton_ops(), torch.float16),
        ("fused", fused, torch.float32)]
results = {}
for name, ops, dtype in runs:
    model = load_cross_encoder(checkpoint, ops, torch.device("cpu"), dtype)
    results[name, str(dtype)] = model(ids, cu_seqlens, max_seqlen)
torch.save(results, out)
"""


def test_whole_model_with_the_cuda_ops_in_the_interpreter(tmp_path):
    """The full CrossEncoder forward with the CUDA op set (every Triton kernel, interpreted
    on CPU tensors; the GEMMs are F.linear but for the FFN's up-projection, run both ways the
    load-time selection can choose: GEMM + bias_gelu, or the fused linear_gelu kernel), fp32
    and fp16, against
    transformers on the same random weights, over random lengths with length 1, and the
    first-token-only last layer: catches what per-kernel tests miss (strides of the QKV
    views, offsets, the last layer)."""
    transformers = pytest.importorskip("transformers")
    from rerank_server.checkpoint import write_random_checkpoint
    checkpoint = write_random_checkpoint(tmp_path / "model", "tiny", seed=7, **TINY_MODEL)
    g = torch.Generator().manual_seed(11)
    seqs = [torch.cat([torch.tensor([0]), torch.randint(5, 300, (n - 2,), generator=g), torch.tensor([2])])
            if n > 1 else torch.tensor([0]) for n in MODEL_LENGTHS]
    torch.save((torch.cat(seqs), cu_from_lengths(MODEL_LENGTHS), max(MODEL_LENGTHS)), checkpoint / "batch.pt")
    run_interpreted(_MODEL_WORKER, checkpoint, tmp_path / "out.pt")
    ours = torch.load(tmp_path / "out.pt")

    hf = transformers.XLMRobertaForSequenceClassification.from_pretrained(
        checkpoint, attn_implementation="eager").eval()
    with torch.inference_mode():
        def hf_logits(model):  # one unpadded call per sequence: no masking in the reference
            return torch.stack([model(input_ids=s[None]).logits[0, 0].float() for s in seqs])
        want, hf16 = hf_logits(hf), hf_logits(hf.half())
    assert want.std() > 1e-3, "the logits must differ for the comparison to mean anything"
    hf16_err = (hf16 - want).abs().max().item()
    for ffn in ("unfused", "fused"):
        assert_close(ours[ffn, "torch.float32"], want, 1e-4, 1e-4,
                     what=f"fp32 model (interpreted CUDA ops, {ffn} FFN) vs transformers")
    ours16 = ours["unfused", "torch.float16"]
    assert ours16.dtype == torch.float32  # the head runs in fp32
    ours16_err = (ours16 - want).abs().max().item()
    assert ours16_err <= 3 * hf16_err + 1e-3, f"fp16: ours {ours16_err:.3g} > 3 x HF fp16's {hf16_err:.3g} + 1e-3"


# ----------------------------------------------------------------------------- launch arithmetic

def test_attention_grid_stays_within_cuda_limits():
    """(sequence x head) on axis x, query blocks on y: any batch the scheduler can form
    launches (the old (blocks, batch, heads) grid failed beyond 65,535 pairs on axis y)."""
    from rerank_kernels._triton import CUDA_GRID_LIMITS, cuda_grid
    from rerank_server.scheduler import MAX_BATCH_PAIRS
    for max_q, batch, heads, head_dim in ((8192, 1, 16, 64), (1, 200_000, 16, 64), (17, 65_536, 16, 64),
                                          (64, 3, 4, 128), (65, 3, 4, 64), (16, 1, 1, 16)):
        block_m = attention.attention_block_m(max_q, head_dim)
        grid = attention.attention_grid(max_q, batch, heads, block_m)
        assert grid == (batch * heads, -(-max_q // block_m))
        # not strict: the grid is 2-D, the limits name three axes
        assert all(1 <= n <= limit for n, limit in zip(grid, CUDA_GRID_LIMITS, strict=False)), grid
    assert [attention.attention_block_m(n, 64) for n in (1, 16, 17, 64, 65, 8192)] == [16, 16, 64, 64, 128, 128]
    assert [attention.attention_block_m(n, 128) for n in (1, 16, 17, 8192)] == [16, 16, 64, 64]
    # the largest batch: MAX_BATCH_PAIRS one-token pairs at 8192 tokens each is not formable,
    # but MAX_BATCH_PAIRS pairs of any length are
    grid = attention.attention_grid(8192, MAX_BATCH_PAIRS, 16, attention.attention_block_m(8192, 64))
    assert grid[0] == MAX_BATCH_PAIRS * 16 <= CUDA_GRID_LIMITS[0]
    assert MAX_BATCH_PAIRS <= attention.FLASH_MAX_BATCH  # FlashAttention's batch is on axis y
    with pytest.raises(ValueError, match="grid dimension y = 70000"):
        cuda_grid(1, 70_000)
    with pytest.raises(ValueError, match="grid dimension x = 0"):
        cuda_grid(0)


# ----------------------------------------------------------------------------- torch's varlen_attn

def _varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature (no scale: it applies 1/sqrt(head_dim))."""


def test_torch_varlen_call_matches_the_installed_signature():
    """Our varlen_attn call binds to the installed torch's signature by the intended names,
    and to torch 2.10's (which has no ``scale``), where a non-default scale is folded into q."""
    import inspect
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    q, k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    cu = cu_from_lengths([2, 3])
    for fn in (varlen_attn, _varlen_attn_2_10):
        for scale in (16 ** -0.5, 0.3):
            args, kwargs = attention.torch_varlen_arguments(fn, q, k, v, cu, cu, 3, 3, scale)
            bound = inspect.signature(fn).bind(*args, **kwargs).arguments  # TypeError if not accepted
            assert bound["key"] is k and bound["value"] is v and bound["cu_seq_q"] is cu and bound["cu_seq_k"] is cu
            assert (bound["max_q"], bound["max_k"]) == (3, 3)
            takes_scale = "scale" in inspect.signature(fn).parameters
            if takes_scale:
                assert bound["query"] is q and bound["scale"] == scale
            else:  # the kernel's 1/sqrt(16) times the folded factor gives the scale asked for
                assert "scale" not in bound
                assert_close(bound["query"] * 16 ** -0.5, q * scale, 1e-6, 1e-6, what="folded scale")
