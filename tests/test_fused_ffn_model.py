"""The FFN as the model runs it: row slices whose LayerNorm is written over the rows they
read, and the fused up-projection kernel inside the whole forward (Triton interpreter)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tensor_checks import assert_close, run_interpreted

import rerank_server.models.encoder as model_module
from rerank_kernels import TORCH_OPS
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.models.encoder import load_cross_encoder

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

TINY = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128, vocab_size=300,
            max_position_embeddings=160)
LENGTHS = [1, 9, 70, 1, 33, 4, 17, 2, 120, 12]  # 269 tokens, two of length 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = write_random_checkpoint(tmp_path_factory.mktemp("ffn"), "tiny", seed=5, **TINY)
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.cat([torch.tensor([0]), torch.randint(5, 300, (n - 1,), generator=g)]) for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    torch.save((ids, cu, max(LENGTHS)), path / "batch.pt")
    return path


def reference_logits(checkpoint: Path, dtype: torch.dtype) -> torch.Tensor:
    model = load_cross_encoder(checkpoint, TORCH_OPS, torch.device("cpu"), dtype)
    return model(*torch.load(checkpoint / "batch.pt"))


def test_ffn_slices_are_written_in_place(checkpoint, monkeypatch):
    """Slices of 50 rows (six of them, the last one short) give the one-slice logits, and
    each slice's LayerNorm lands in the block's own activation (no second buffer)."""
    want = reference_logits(checkpoint, torch.float32)
    model = load_cross_encoder(checkpoint, TORCH_OPS, torch.device("cpu"), torch.float32)
    calls = []

    def add_layernorm(x, residual, weight, bias, eps, out=None):
        calls.append((residual.shape[0], out is not None and out.data_ptr() == residual.data_ptr()))
        return TORCH_OPS.add_layernorm(x, residual, weight, bias, eps, out=out)
    model.ops = replace(TORCH_OPS, add_layernorm=add_layernorm)
    monkeypatch.setattr(model_module, "FFN_ROWS", 50)
    got = model(*torch.load(checkpoint / "batch.pt"))
    assert_close(got, want, 1e-5, 1e-5, what="FFN in 50-row slices vs one slice")
    total = sum(LENGTHS)
    # per full layer: the attention LayerNorm (fresh output), then one in-place LayerNorm per slice
    full_layer = [(total, False)] + [(min(50, total - s), True) for s in range(0, total, 50)]
    assert calls == full_layer + [(len(LENGTHS), False), (len(LENGTHS), True)], calls


_WORKER = """
import sys
from dataclasses import replace
from pathlib import Path
import torch
import rerank_server.models.encoder as model_module
from rerank_kernels import triton_ops
from rerank_kernels.linear_gelu import linear_gelu_triton
checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
model_module.FFN_ROWS = 100  # three slices of the 269-token batch
ops = replace(triton_ops(), measured_linear_gelu=linear_gelu_triton)
results = {}
for dtype in (torch.float32, torch.float16):
    model = model_module.load_cross_encoder(checkpoint, ops, torch.device("cpu"), dtype)
    results[str(dtype)] = model(*torch.load(checkpoint / "batch.pt"))
torch.save(results, out)
"""


def test_whole_model_with_the_fused_ffn_in_the_interpreter(checkpoint, tmp_path):
    """The CUDA op set with the fused up-projection chosen, every Triton kernel interpreted
    on CPU tensors, FFN in several slices written in place: the same logits as the CPU ops."""
    pytest.importorskip("triton")
    run_interpreted(_WORKER, checkpoint, tmp_path / "out.pt")
    ours = torch.load(tmp_path / "out.pt")
    want = reference_logits(checkpoint, torch.float32)
    assert want.std() > 1e-3, "the logits must differ for the comparison to mean anything"
    assert_close(ours["torch.float32"], want, 1e-4, 1e-4, what="fp32, fused FFN (interpreted) vs CPU ops")
    cpu16_err = (reference_logits(checkpoint, torch.float16) - want).abs().max().item()
    ours16_err = (ours["torch.float16"] - want).abs().max().item()
    assert ours16_err <= 3 * cpu16_err + 1e-3, f"fp16: ours {ours16_err:.3g} > 3 x CPU fp16's {cpu16_err:.3g} + 1e-3"
