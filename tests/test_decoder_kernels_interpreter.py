"""The decoder's Triton kernels (RMSNorm with the residual, q/k norm + RoPE, SwiGLU) under the Triton
interpreter (CPU) against their PyTorch references, on tiny and odd shapes, in one child process
(TRITON_INTERPRET=1 must be set before triton is imported: see test_kernels_interpreter.py). The
interpreter has no bf16: fp32 and fp16."""
from __future__ import annotations

import pytest
import torch
from tensor_checks import assert_close, run_interpreted

from rerank_kernels.rmsnorm import add_rmsnorm_torch
from rerank_kernels.rotary import norm_rope_torch, rope_table
from rerank_kernels.swiglu import swiglu_torch

pytest.importorskip("triton")

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

# both sides round at the same places; fp16 may still differ by an ulp where fp32 math fuses
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}

_WORKER = """
import sys
import torch
from rerank_kernels.rmsnorm import add_rmsnorm_triton
from rerank_kernels.rotary import norm_rope_triton
from rerank_kernels.swiglu import swiglu_triton
cases = torch.load(sys.argv[1], weights_only=False)
out = {}
for name, (kind, args) in cases.items():
    if kind == "rmsnorm":
        out[name] = add_rmsnorm_triton(*args)
    elif kind == "swiglu":
        out[name] = swiglu_triton(*args)
    else:
        x = args[0]
        norm_rope_triton(*args)
        out[name] = x
torch.save(out, sys.argv[2])
"""


def cases() -> dict[str, tuple[str, tuple]]:
    g = torch.Generator().manual_seed(0)
    cos, sin = rope_table(64, 16, 1e6)
    found = {}
    for dtype in TOL:
        name = str(dtype).removeprefix("torch.")
        for rows, hidden in ((1, 48), (9, 80), (5, 200)):
            x = (3 * torch.randn(rows, hidden, generator=g)).to(dtype)
            residual = torch.randn(rows, hidden, generator=g).to(dtype)
            weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
            found[f"rmsnorm-{name}-{rows}x{hidden}"] = ("rmsnorm", (x, residual, weight, 1e-6))
            found[f"rmsnorm-{name}-{rows}x{hidden}-first"] = ("rmsnorm", (x, None, weight, 1e-6))
        for rows, ffn in ((1, 24), (7, 80), (3, 300)):
            gate_up = (2 * torch.randn(rows, 2 * ffn, generator=g)).to(dtype)
            found[f"swiglu-{name}-{rows}x{ffn}"] = ("swiglu", (gate_up,))
        # q and k as views of one fused projection, as the model passes them; positions restart per pair
        for rows, heads in ((1, 1), (6, 3)):
            fused = torch.randn(rows, heads + 2, 16, generator=g).to(dtype)
            positions = torch.tensor([0, 1, 2, 40, 41, 63][:rows])
            weight = (1 + 0.1 * torch.randn(16, generator=g)).to(dtype)
            found[f"rope-{name}-{rows}x{heads}"] = ("rope", (fused[:, :heads], weight, cos[positions], sin[positions],
                                                             1e-6))
    return found


def reference(kind: str, args: tuple):
    if kind == "rmsnorm":
        return add_rmsnorm_torch(*args)
    if kind == "swiglu":
        return swiglu_torch(*args)
    x = args[0].clone()
    norm_rope_torch(x, *args[1:])
    return x


def test_decoder_kernels_match_their_references(tmp_path):
    all_cases = cases()
    torch.save(all_cases, tmp_path / "cases.pt")
    run_interpreted(_WORKER, tmp_path / "cases.pt", tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, (kind, args) in all_cases.items():
        expected = reference(kind, args)
        tol = TOL[args[0].dtype]
        if kind == "rmsnorm":
            assert_close(got[name][0], expected[0], *tol, what=f"{name} normed")
            assert_close(got[name][1], expected[1], *tol, what=f"{name} summed")
        else:
            assert_close(got[name], expected, *tol, what=name)
