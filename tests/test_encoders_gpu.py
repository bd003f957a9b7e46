"""ModernBERT's and DeBERTa-v2's CUDA paths on a real GPU: the windowed attention backends and the
rotary kernel against their references, and each half-precision model against transformers in fp32
(within 3x transformers' own half-precision error). Skipped, with the reason shown under ``-ra``,
where torch sees no CUDA device. (Not yet run on a GPU: this session had none.)"""
from __future__ import annotations

import pytest
import test_deberta_v2
import test_modernbert
import torch
from tensor_checks import assert_close

from rerank_kernels import available_attention_backends
from rerank_kernels.local_attention import local_attention_torch, select_local_attention
from rerank_kernels.rope import rope_torch, rope_triton
from rerank_kernels.rotary import rope_table
from rerank_server.encoder_checkpoints import write_encoder_checkpoint
from rerank_server.engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

CUDA = torch.device("cuda")
HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", [b for b in ("flash-attn", "torch-varlen")
                                     if b in available_attention_backends("cuda", torch.float16)])
def test_windowed_attention_backends_match_the_reference(backend):
    """The window's edge included (distance <= 64), sequences shorter and far longer than it."""
    g = torch.Generator().manual_seed(1)
    lengths = [1, 60, 129, 3000, 200]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=CUDA)
    q, k, v = (torch.randn(sum(lengths), 12, 64, generator=g).to(CUDA, torch.float16) for _ in range(3))
    got = select_local_attention(backend)(q, k, v, cu, max(lengths), 64, 0.125)
    want = local_attention_torch(q.float(), k.float(), v.float(), cu, max(lengths), 64, 0.125)
    assert_close(got, want, 3e-3, 3e-3, what=backend)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=str)
def test_rope_kernel_matches_its_reference(dtype):
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(300, 3, 12, 64, generator=g).to(CUDA, dtype)
    positions = torch.randint(0, 8192, (300,), generator=g).to(CUDA)
    cos, sin = (t.to(CUDA) for t in rope_table(8192, 64, 160000.0))
    got, want = fused.clone(), fused.clone()
    for i in (0, 1):
        rope_triton(got[:, i], positions, cos, sin)
        rope_torch(want[:, i], positions, cos, sin)
    assert_close(got, want, 1e-2 if dtype == torch.bfloat16 else 2e-3, 2e-3, what="rope")


@pytest.mark.parametrize("family", ["modernbert", "deberta-v2"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_model_within_three_times_transformers_own_error(family, dtype, tmp_path):
    module = test_modernbert if family == "modernbert" else test_deberta_v2
    path = write_encoder_checkpoint(tmp_path, family, seed=31)
    engine = Engine.load(str(path), "cuda", dtype=str(dtype).removeprefix("torch."))
    pairs = engine.tokenizer.encode_pairs(module.QUERY, module.documents(8, seed=4, longest=400))
    if family == "modernbert":
        def hf(dtype):
            return test_modernbert.hf_scores(path, [list(p) for p in pairs], dtype)
    else:
        def hf(dtype):
            return test_deberta_v2.hf_scores(path, pairs, dtype)
    reference = hf(torch.float32)
    hf_error = (hf(dtype) - reference).abs().max()
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    assert (ours - reference).abs().max() <= 3 * hf_error + 1e-3, (engine.model.ops.attention_backend, hf_error)
