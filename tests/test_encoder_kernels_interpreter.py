"""ModernBERT's CUDA op set under the Triton interpreter (CPU): the rotary kernel against its PyTorch
reference on tiny and odd shapes (fp32, fp16; views of a fused projection), and the whole ModernBERT
forward with ``triton_ops()`` (Triton rotary and varlen attention, the local layers' windowed
reference) against the CPU path, in one child process (TRITON_INTERPRET=1 must be set before triton
is imported: see test_kernels_interpreter.py)."""
from __future__ import annotations

import pytest
import torch
from tensor_checks import assert_close, run_interpreted

from rerank_kernels.rope import rope_torch
from rerank_kernels.rotary import rope_table
from rerank_server.encoder_checkpoints import write_encoder_checkpoint
from rerank_server.engine import Engine

pytest.importorskip("triton")

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}

_WORKER = """
import sys
from pathlib import Path
import torch
from rerank_kernels import triton_ops
from rerank_kernels.rope import rope_triton
from rerank_server.models.modernbert import ModernBertReranker
cases, checkpoint, batch = torch.load(sys.argv[1], weights_only=False)
out = {}
for name, (x, positions, cos, sin) in cases.items():
    rope_triton(x, positions, cos, sin)
    out[name] = x
model = ModernBertReranker.load(Path(checkpoint), triton_ops(), torch.device("cpu"), torch.float32)
assert model.ops.rope is rope_triton
out["model"] = model(*batch)
torch.save(out, sys.argv[2])
"""


def rope_cases() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    cos, sin = rope_table(64, 16, 160000.0)
    found = {}
    for dtype in TOL:
        for rows, heads in ((1, 1), (6, 3), (5, 2)):
            fused = (3 * torch.randn(rows, 3, heads, 16, generator=g)).to(dtype)  # q, k, v as the model's
            positions = torch.tensor([0, 1, 2, 40, 41, 63][:rows])
            found[f"{dtype}-{rows}x{heads}-q"] = (fused[:, 0], positions, cos, sin)
            found[f"{dtype}-{rows}x{heads}-k"] = (fused[:, 1], positions, cos, sin)
    return found


def test_rope_kernel_and_the_modernbert_forward_match_the_references(tmp_path):
    checkpoint = write_encoder_checkpoint(tmp_path / "mb", "modernbert", seed=2, local_attention=8,
                                          num_attention_heads=4, hidden_size=64)
    engine = Engine.load(str(checkpoint), "cpu")
    pairs = engine.tokenizer.encode_pairs("a query", ["a short one", "a longer document " * 6, ""])
    lengths = [len(p) for p in pairs]
    batch = (torch.tensor([t for p in pairs for t in p]),
             torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32), max(lengths))
    assert max(lengths) > 2 * 4 + 1  # beyond the window
    cases = rope_cases()
    torch.save((cases, str(checkpoint), batch), tmp_path / "cases.pt")
    run_interpreted(_WORKER, tmp_path / "cases.pt", tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, (x, positions, cos, sin) in cases.items():
        expected = x.clone()
        rope_torch(expected, positions, cos, sin)
        assert_close(got[name], expected, *TOL[x.dtype], what=name)
    assert_close(got["model"], engine.model(*batch), 1e-4, 1e-4, what="ModernBERT logits")
