"""The CUDA path on a real GPU: every Triton kernel against its PyTorch reference, every
available attention backend against the others, and the whole fp16 model against
transformers' XLMRobertaForSequenceClassification in fp32 on the same random weights.
Skipped, with the reason shown under ``-ra``, where torch sees no CUDA device."""
from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensor_checks import assert_close
from torch.nn.attention import SDPBackend, sdpa_kernel

from rerank_kernels import ATTENTION_BACKENDS, available_attention_backends, select_ops
from rerank_kernels.attention import select_attention, varlen_attention_torch, varlen_attention_triton
from rerank_kernels.embeddings import embed_layernorm_torch, embed_layernorm_triton
from rerank_kernels.gelu import bias_gelu_torch, bias_gelu_triton
from rerank_kernels.layernorm import add_layernorm_torch, add_layernorm_triton
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.engine import Engine
from rerank_server.models.encoder import load_cross_encoder

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Glue ops: both sides compute in fp32 and round once: at most an ulp apart.
GLUE_TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2), torch.float32: (2e-5, 2e-5)}
# Attention against the fp32 answer: the backends round probabilities to the input dtype.
ATTENTION_TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-4, 1e-4)}
HALF = [torch.float16, torch.bfloat16]


def random_lengths(seed: int, batch: int = 24, longest: int = 700) -> list[int]:
    """Mostly short sequences, two of length 1 and one long one."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 200, (batch,), generator=g).tolist()
    lengths[0] = lengths[batch // 2] = 1
    lengths[-2] = longest
    return lengths


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=CUDA)


# ----------------------------------------------------------------------------- glue kernels

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1024, 80])
@pytest.mark.parametrize("offset, with_types", [(2, False), (0, True)], ids=["roberta", "bert"])
def test_embed_layernorm(dtype, hidden, offset, with_types):
    torch.manual_seed(0)
    lengths = random_lengths(hidden)
    cu, total, vocab = cu_seqlens(lengths), sum(lengths), 5000
    args = (torch.randint(0, vocab, (total,), device=CUDA), cu, torch.randn(vocab, hidden, device=CUDA, dtype=dtype),
            torch.randn(max(lengths) + offset, hidden, device=CUDA, dtype=dtype),
            torch.randn(2, hidden, device=CUDA, dtype=dtype), 1 + 0.1 * torch.randn(hidden, device=CUDA, dtype=dtype),
            0.1 * torch.randn(hidden, device=CUDA, dtype=dtype), 1e-5, offset,
            torch.randint(0, 2, (total,), device=CUDA) if with_types else None)
    out = embed_layernorm_triton(*args)
    assert out.dtype == dtype
    assert_close(out, embed_layernorm_torch(*args), *GLUE_TOL[dtype], what="embed_layernorm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(3001, 1024), (17, 80)])
def test_add_layernorm(dtype, rows, hidden):
    torch.manual_seed(1)
    x = 3 * torch.randn(rows, hidden, device=CUDA, dtype=dtype) + 1
    residual = torch.randn(rows, hidden, device=CUDA, dtype=dtype)
    weight = 1 + 0.1 * torch.randn(hidden, device=CUDA, dtype=dtype)
    bias = 0.1 * torch.randn(hidden, device=CUDA, dtype=dtype)
    out = add_layernorm_triton(x, residual, weight, bias, 1e-5)
    assert out.dtype == dtype
    assert_close(out, add_layernorm_torch(x, residual, weight, bias, 1e-5), *GLUE_TOL[dtype], what="add_layernorm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,features", [(3001, 4096), (17, 200)])
def test_bias_gelu(dtype, rows, features):
    torch.manual_seed(2)
    x = 3 * torch.randn(rows, features, device=CUDA, dtype=dtype)
    bias = torch.randn(features, device=CUDA, dtype=dtype)
    out = bias_gelu_triton(x, bias)
    assert out.dtype == dtype
    assert_close(out, bias_gelu_torch(x, bias), *GLUE_TOL[dtype], what="bias_gelu")


# ----------------------------------------------------------------------------- attention

def attention_inputs(dtype, first_token_only: bool, heads: int = 16, head_dim: int = 64, seed: int = 3):
    """(q, k, v, cu_q, cu_k, max_q, max_k, scale) with K and V as views into one fused tensor,
    as the model passes them; ``first_token_only`` is the last layer's one query per sequence."""
    torch.manual_seed(seed)
    lengths = random_lengths(seed)
    cu_k, total = cu_seqlens(lengths), sum(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, device=CUDA, dtype=dtype)
    if first_token_only:
        q = qkv[cu_k[:-1].long(), 0]
        cu_q, max_q = torch.arange(len(lengths) + 1, device=CUDA, dtype=torch.int32), 1
    else:
        q, cu_q, max_q = qkv[:, 0], cu_k, max(lengths)
    return q, qkv[:, 1], qkv[:, 2], cu_q, cu_k, max_q, max(lengths), head_dim ** -0.5


def fp32_reference(q, k, v, *rest):
    """The exact answer for the inputs as given: fp32 copies through SDPA's math backend
    (the fused fp32 SDPA kernels may round through TF32)."""
    with sdpa_kernel(SDPBackend.MATH):
        return varlen_attention_torch(q.float(), k.float(), v.float(), *rest)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("first_token_only", [False, True], ids=["all-queries", "first-token"])
@pytest.mark.parametrize("head_dim", [64, 128, 32])
def test_triton_attention_matches_reference(dtype, first_token_only, head_dim):
    args = attention_inputs(dtype, first_token_only, heads=4 if head_dim != 64 else 16, head_dim=head_dim)
    out = varlen_attention_triton(*args)
    assert out.dtype == dtype
    assert_close(out, fp32_reference(*args), *ATTENTION_TOL[dtype], what="triton attention")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("first_token_only", [False, True], ids=["all-queries", "first-token"])
def test_attention_backends_agree(dtype, first_token_only):
    """Every available backend against the fp32 answer and against every other backend."""
    names = available_attention_backends(CUDA, dtype)
    args = attention_inputs(dtype, first_token_only)
    outs = {name: select_attention(CUDA, name, dtype)[1](*args) for name in names}
    reference = fp32_reference(*args)
    atol, rtol = ATTENTION_TOL[dtype]
    for name, out in outs.items():
        assert_close(out, reference, atol, rtol, what=f"{name} vs fp32")
    for a, b in itertools.combinations(names, 2):
        assert_close(outs[a], outs[b], 2 * atol, 2 * rtol, what=f"{a} vs {b}")


def test_backend_selection_on_cuda():
    names = available_attention_backends(CUDA)
    assert names[-2:] == ["triton", "torch-sdpa"], names  # triton is installed with the test extra
    ops = select_ops(CUDA)
    assert ops.attention_backend == names[0]
    assert (ops.embed_layernorm, ops.add_layernorm, ops.bias_gelu) == (
        embed_layernorm_triton, add_layernorm_triton, bias_gelu_triton)
    for name in ATTENTION_BACKENDS:
        if name in names:
            assert select_ops(CUDA, name).attention_backend == name
        else:
            with pytest.raises(ValueError, match=f"{name!r} is unavailable"):
                select_ops(CUDA, name)
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_ops(CUDA, "flash")
    # FlashAttention kernels take fp16/bf16 only: an fp32 model falls back to Triton.
    assert select_ops(CUDA, dtype=torch.float32).attention_backend == "triton"


# ----------------------------------------------------------------------------- the whole model

VOCAB = 5000
# head_dim 64 as in bge-reranker-v2-m3, a small vocabulary to keep the checkpoint small.
MODEL = dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=3, intermediate_size=1024,
             vocab_size=VOCAB, max_position_embeddings=1026)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("gpu-model"), "tiny", seed=21, **MODEL)


@pytest.fixture(scope="module")
def hf_models(checkpoint):
    transformers = pytest.importorskip("transformers")
    hf32 = transformers.XLMRobertaForSequenceClassification.from_pretrained(
        checkpoint, attn_implementation="eager").eval().to(CUDA)
    return hf32, copy.deepcopy(hf32).half()


def model_batch(seed: int = 5):
    """Token lists shaped like pairs (<s> ... </s>), never the pad id 1, with one long one."""
    g = torch.Generator().manual_seed(seed)
    lengths = [4, 17, 64, 300, 9, 1000, 33, 6, 130, 2]
    seqs = [torch.cat([torch.tensor([0]), torch.randint(5, VOCAB, (n - 2,), generator=g), torch.tensor([2])])
            for n in lengths]
    return seqs, lengths


def hf_logits(hf, seqs) -> torch.Tensor:
    """One unpadded call per sequence: the reference has no masking in it."""
    with torch.inference_mode():
        return torch.stack([hf(input_ids=s[None].to(CUDA)).logits[0, 0].float() for s in seqs]).cpu()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_fp16_model_matches_transformers(backend, checkpoint, hf_models):
    """ours fp16 vs HF fp32: max abs logit error <= 3x HF fp16's own, and the same ranking."""
    if backend not in available_attention_backends(CUDA, torch.float16):
        pytest.skip(f"{backend} is not available on this machine")
    ours = load_cross_encoder(checkpoint, select_ops(CUDA, backend), CUDA, torch.float16)
    hf32, hf16 = hf_models
    seqs, lengths = model_batch()
    got = ours(torch.cat(seqs).to(CUDA), cu_seqlens(lengths), max(lengths)).cpu()
    want, hf16_logits = hf_logits(hf32, seqs), hf_logits(hf16, seqs)
    assert want.std() > 1e-3, "the logits must differ for the comparison to mean anything"
    ours_err, hf16_err = (got - want).abs().max().item(), (hf16_logits - want).abs().max().item()
    bound = 3 * hf16_err + 1e-3
    assert ours_err <= bound, f"{backend}: ours fp16 max abs error {ours_err:.3g} > 3 x HF fp16's {hf16_err:.3g} + 1e-3"
    # Same order as HF fp32, except pairs closer than twice HF fp16's own error, which fp16
    # noise may swap (random weights cluster the logits: most pairs are still checked).
    tie = 2 * hf16_err
    swapped = [(i, j) for i, j in itertools.permutations(range(len(seqs)), 2)
               if want[i] - want[j] > tie and not got[i] > got[j]]
    assert not swapped, \
        f"{backend}: order differs from HF fp32 for pairs {swapped}: ours {got.tolist()}, HF {want.tolist()}"


@pytest.mark.parametrize("backend", [b for b in ATTENTION_BACKENDS if b != "torch-sdpa"])
def test_forward_never_waits_on_the_device(backend, checkpoint):
    """No host sync (.item(), .tolist(), nonzero, D2H copy) in the CUDA forward: the host can
    queue the whole forward ahead of the GPU. torch-sdpa, the reference, reads cu_seqlens on
    the host and is left out."""
    if backend not in available_attention_backends(CUDA, torch.float16):
        pytest.skip(f"{backend} is not available on this machine")
    ours = load_cross_encoder(checkpoint, select_ops(CUDA, backend), CUDA, torch.float16)
    seqs, lengths = model_batch()
    ids, cu = torch.cat(seqs).to(CUDA), cu_seqlens(lengths)
    ours(ids, cu, max(lengths))  # first call compiles and autotunes outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = ours(ids, cu, max(lengths))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.shape == (len(lengths),) and logits.isfinite().all()


def test_engine_launch_queues_without_waiting(checkpoint):
    """Engine.launch returns before the device is done (the scheduler launches the next batch
    meanwhile); each wait gives the same logits as a plain forward."""
    engine = Engine.load(str(checkpoint), device="cuda")
    assert engine.asynchronous
    seqs, _ = model_batch()
    first, second = [s.tolist() for s in seqs[:5]], [s.tolist() for s in seqs[5:]]
    want = engine.forward(first), engine.forward(second)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        waits = engine.launch(first), engine.launch(second)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (waits[0](), waits[1]()) == want


# ----------------------------------------------------------------------------- serving behaviour

def test_wait_blocks_without_spinning(checkpoint):
    """The engine's wait sleeps on a blocking CUDA event: while the device is busy for
    ~0.3 s the waiting thread uses a small fraction of a core."""
    engine = Engine.load(str(checkpoint), device="cuda")
    seqs, _ = model_batch()
    pairs = [s.tolist() for s in seqs]
    engine.forward(pairs)
    torch.cuda.synchronize()
    torch.cuda._sleep(600_000_000)  # GPU cycles: ~0.3 s at 2 GHz
    wait = engine.launch(pairs)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    wait()
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    assert wall > 0.1, f"the device was not busy ({wall:.3f} s): the check means nothing"
    assert cpu < 0.5 * wall, f"the wait used {cpu:.3f} s of CPU in {wall:.3f} s: it spins"


_NO_COMPILE_CHILD = """
import json, os, sys
import torch
from rerank_server.engine import Engine
engine = Engine.load(sys.argv[1], device="cuda", attention=sys.argv[2])
engine.warm_up()
torch.cuda.synchronize()
cache = os.environ["TRITON_CACHE_DIR"]
def files():
    return {os.path.relpath(os.path.join(root, f), cache) for root, _, names in os.walk(cache) for f in names}
before = files()
g = torch.Generator().manual_seed(0)
longest = [1, 2, 5, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 500, 1000]
for i, pairs in enumerate([1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 48, 64, 100, 127, 128, 129, 255, 256, 1000]):
    top = longest[i % len(longest)]
    lengths = torch.randint(1, top + 1, (pairs,), generator=g).tolist()
    lengths[0] = top
    batch = [[0] + torch.randint(5, 4000, (n - 1,), generator=g).tolist() for n in lengths]
    logits = engine.forward(batch)
    assert len(logits) == pairs
torch.cuda.synchronize()
print("RESULT " + json.dumps({"warm_up_files": len(before), "new_files": sorted(files() - before)}))
"""


@pytest.mark.parametrize("backend", ["triton", "torch-varlen", "flash-attn"])
def test_no_compile_after_warm_up(backend, checkpoint, tmp_path):
    """After Engine.warm_up, a spread of batch shapes (pair counts 1..1000: 1, odd, multiples
    of 16; longest sequence in every attention tier) adds nothing to Triton's compile cache.
    A fresh cache directory in a child process, so every compile of the run shows there."""
    if backend not in available_attention_backends(CUDA, torch.float16):
        pytest.skip(f"{backend} is not available on this machine")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _NO_COMPILE_CHILD, str(checkpoint), backend],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    found = json.loads(next(line for line in result.stdout.splitlines()
                            if line.startswith("RESULT ")).removeprefix("RESULT "))
    assert found["warm_up_files"] > 0, "warm-up compiled nothing into the cache: the check means nothing"
    assert not found["new_files"], f"{backend}: compiled after warm-up: {found['new_files']}"
