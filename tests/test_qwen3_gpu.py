"""Qwen3-Reranker's CUDA path on a real GPU: the decoder's Triton kernels against their PyTorch
references, the causal attention backends against the reference, and the whole half-precision model
against transformers in fp32 (within 3x transformers' own half-precision error), the shared prefix
included. Skipped, with the reason shown under ``-ra``, where torch sees no CUDA device."""
from __future__ import annotations

import pytest
import torch
from tensor_checks import assert_close
from test_qwen3 import DOCUMENTS, QUERY, card_scores, long_documents, qwen3_checkpoint, qwen3_tokenizer_dir  # noqa: F401

from rerank_kernels import available_attention_backends
from rerank_kernels.causal_attention import causal_attention_torch, select_causal_attention
from rerank_kernels.rmsnorm import add_rmsnorm_torch, add_rmsnorm_triton
from rerank_kernels.rotary import norm_rope_torch, norm_rope_triton, rope_table
from rerank_kernels.swiglu import swiglu_torch, swiglu_triton
from rerank_server.engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

CUDA = torch.device("cuda")
HALF = [torch.float16, torch.bfloat16]
TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2), torch.float32: (2e-5, 2e-5)}


@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=str)
def test_decoder_kernels_match_their_references(dtype):
    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(300, 1024, generator=g).to(CUDA, dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(1024, generator=g)).to(CUDA, dtype)
    for got, want in zip(add_rmsnorm_triton(x, residual, weight, 1e-6), add_rmsnorm_torch(x, residual, weight, 1e-6),
                         strict=True):
        assert_close(got, want, *TOL[dtype], what="add_rmsnorm")
    gate_up = torch.randn(300, 2 * 3072, generator=g).to(CUDA, dtype)
    assert_close(swiglu_triton(gate_up), swiglu_torch(gate_up), *TOL[dtype], what="swiglu")
    fused = torch.randn(300, 32, 128, generator=g).to(CUDA, dtype)  # q (16 heads) and k (8) of one projection
    positions = torch.randint(0, 4000, (300,), generator=g).to(CUDA)
    cos, sin = (t.to(CUDA) for t in rope_table(4096, 128, 1e6))
    head_weight = (1 + 0.1 * torch.randn(128, generator=g)).to(CUDA, dtype)
    got, want = fused.clone(), fused.clone()
    norm_rope_triton(got[:, :16], head_weight, cos[positions], sin[positions], 1e-6)
    norm_rope_torch(want[:, :16], head_weight, cos[positions], sin[positions], 1e-6)
    assert_close(got, want, *TOL[dtype], what="norm_rope")


@pytest.mark.parametrize("backend", [b for b in ("flash-attn", "torch-varlen")
                                     if b in available_attention_backends("cuda", torch.float16)])
def test_causal_attention_backends_match_the_reference(backend):
    """Queries fewer than keys (a document after its prefix; the last layer's last tokens), GQA 16/8."""
    g = torch.Generator().manual_seed(1)
    len_q, len_k = [5, 1, 40, 300], [70, 1, 40, 360]
    cu_q = torch.tensor([0, *torch.tensor(len_q).cumsum(0).tolist()], dtype=torch.int32, device=CUDA)
    cu_k = torch.tensor([0, *torch.tensor(len_k).cumsum(0).tolist()], dtype=torch.int32, device=CUDA)
    q = torch.randn(sum(len_q), 16, 128, generator=g).to(CUDA, torch.float16)
    k, v = (torch.randn(sum(len_k), 8, 128, generator=g).to(CUDA, torch.float16) for _ in range(2))
    got = select_causal_attention(backend)(q, k, v, cu_q, cu_k, max(len_q), max(len_k), 128 ** -0.5)
    want = causal_attention_torch(q.float(), k.float(), v.float(), cu_q, cu_k, max(len_q), max(len_k), 128 ** -0.5)
    assert_close(got, want, 3e-3, 3e-3, what=backend)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_model_within_three_times_transformers_own_error(dtype, qwen3_tokenizer_dir, tmp_path):  # noqa: F811
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir, seed=29, tie_word_embeddings=False)
    engine = Engine.load(str(path), "cuda", dtype=str(dtype).removeprefix("torch."))
    pairs = engine.tokenizer.encode_pairs(QUERY, DOCUMENTS + long_documents(4, seed=5, longest=900))
    ids = [list(p) for p in pairs]
    reference = card_scores(path, ids)[0]
    hf_error = (card_scores(path, ids, dtype)[0] - reference).abs().max()
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    assert (ours - reference).abs().max() <= 3 * hf_error + 1e-3, (engine.model.ops.attention_backend, hf_error)
