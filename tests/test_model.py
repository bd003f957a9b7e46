"""The model's memory and precision rules, on the CPU: the classification head in fp32,
the fused QKV freed before the FFN."""
import weakref
from dataclasses import replace

import pytest
import torch

from rerank_kernels import TORCH_OPS
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.models.encoder import load_cross_encoder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("model"), "tiny", seed=3, vocab_size=300,
                                   max_position_embeddings=130)


def batch():
    lengths = [5, 1, 40, 9]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (sum(lengths),), generator=g)
    cu = torch.tensor([0, 5, 6, 46, 55], dtype=torch.int32)
    return ids, cu, max(lengths)


def test_head_runs_in_fp32_for_an_fp16_model(checkpoint):
    """fp16 encoder, fp32 head: the logits are not rounded to fp16 steps (~0.008 above 8)."""
    model = load_cross_encoder(checkpoint, TORCH_OPS, torch.device("cpu"), torch.float16)
    assert model.layers[0].qkv.weight.dtype == torch.float16
    dense, out = model.head_dense, model.head_out
    assert {t.dtype for t in (dense.weight, dense.bias, out.weight, out.bias)} == {torch.float32}
    rows = (torch.randn(6, model.config.hidden_size) * 3).half()
    out.weight.mul_(40)  # logits far above 8 in magnitude
    got = model.head(rows)
    want = torch.tanh(rows.double() @ dense.weight.double().T + dense.bias.double())
    want = (want @ out.weight.double().T + out.bias.double()).squeeze(-1)
    assert got.dtype == torch.float32
    assert want.abs().max() > 8
    assert (got.double() - want).abs().max() < 1e-4  # fp16 output would be off by up to ~0.03 here


def test_fused_qkv_is_freed_before_the_ffn(checkpoint):
    """The Q/K/V views must not keep the (tokens, 3 * hidden) QKV alive through the FFN."""
    fused: list[weakref.ref] = []
    alive_in_ffn: list[bool] = []

    def attention(q, k, *rest):
        fused.append(weakref.ref(k._base if k._base is not None else k))
        return TORCH_OPS.varlen_attention(q, k, *rest)

    def bias_gelu(x, bias):
        alive_in_ffn.append(fused[-1]() is not None)
        return TORCH_OPS.bias_gelu(x, bias)
    ops = replace(TORCH_OPS, varlen_attention=attention, bias_gelu=bias_gelu)
    model = load_cross_encoder(checkpoint, ops, torch.device("cpu"), torch.float32)
    logits = model(*batch())
    assert logits.shape == (4,) and logits.isfinite().all()
    assert len(alive_in_ffn) == model.config.num_layers
    assert not any(alive_in_ffn), f"the fused QKV was alive in the FFN of layers {alive_in_ffn}"
