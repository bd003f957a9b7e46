"""GEMM candidates at the model's shapes, per dtype: what the forward's FLOP rate is compared
with. On the CPU: ``F.linear`` (MKL for fp32 on x86), oneDNN with the weight reordered once
(``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, as the server may choose
at load) and, in fp32 with the ``bench`` extra, onnxruntime's MatMul (MLAS); in int8 the server's
int8 candidates (rerank_kernels.linear_int8), each timed as the whole call the model makes (per-row
quantization, the int8 GEMM, the epilogue) on fp32 activations. On CUDA ``F.linear``."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.measure import best_layer_mix, fmt_rate, gemm_rate
from benchmarks.onnx_baseline import matmul_calls, onnx_unavailable_reason
from rerank_server.models.encoder import EncoderConfig

# A candidate builds its inputs for (k, n, m, dtype, device, generator) -> a callable that runs
# the (m, k) x (k, n) GEMM with bias once.
Candidate = Callable[[int, int, int, torch.dtype, torch.device, torch.Generator], Callable[[], object]]


def _inputs(k, n, m, dtype, device, g):
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device, dtype)
    return x, w, torch.randn(n, generator=g).to(device, dtype)


def f_linear(k, n, m, dtype, device, g):
    x, w, b = _inputs(k, n, m, dtype, device, g)
    return lambda: F.linear(x, w, b)


def onednn_reordered(k, n, m, dtype, device, g):
    x, w, b = _inputs(k, n, m, dtype, device, g)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def int8_call(module):
    """A candidate: ``module`` (an int8 linear of rerank_kernels.linear_int8) on fp32 inputs."""
    def build(k, n, m, dtype, device, g):
        x, w, b = _inputs(k, n, m, torch.float32, device, g)
        linear = module(w, b)
        return lambda: linear(x)
    return build


def onnxruntime_matmul(k, n, m, dtype, device, g):
    return matmul_calls(k, n, m, torch.get_num_threads())


def candidates(device: torch.device, dtype: torch.dtype) -> dict[str, Candidate]:
    """The GEMMs worth measuring for ``dtype`` on ``device``, by name."""
    if dtype == torch.int8:
        from rerank_kernels.linear_int8 import IntMmLinear, OneDnnInt8Linear, onednn_int8_missing
        found = {"torch._int_mm per-row": int8_call(IntMmLinear)}
        if onednn_int8_missing() is None:
            found["oneDNN int8 per-row"] = int8_call(OneDnnInt8Linear)
        return found
    found: dict[str, Candidate] = {"F.linear": f_linear}
    if device.type == "cpu":
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            found["oneDNN reordered"] = onednn_reordered
        if dtype == torch.float32 and onnx_unavailable_reason() is None:
            found["onnxruntime MatMul"] = onnxruntime_matmul
    return found


def measure_candidates(c: EncoderConfig, m: int, dtype: torch.dtype, device: torch.device, repeats: int,
                       quiet_wait_s: float, previous: dict | None = None) -> dict:
    """Every candidate's rate per shape and over one layer's mix; with ``previous`` (an earlier
    call's result) also each candidate's best of both and the best candidate: the reference."""
    out = {"dtype": str(dtype).removeprefix("torch."), "m": m, "candidates": {}}
    for name, build in candidates(device, dtype).items():
        print(f"GEMM rate ({name}, {out['dtype']}, M={m}) ...", flush=True)
        try:
            r = gemm_rate(c, m, dtype, device, repeats, quiet_wait_s, build)
        except (RuntimeError, NotImplementedError) as e:  # an op this torch or CPU lacks: noted, not fatal
            print(f"  not measured: {e.__class__.__name__}: {str(e)[:200]}", flush=True)
            out["candidates"][name] = {"error": f"{e.__class__.__name__}: {e}"}
            continue
        print("  " + ", ".join(f"{k}: {fmt_rate(v)}" for k, v in r["per_shape_flops_per_s"].items())
              + f"; layer mix {fmt_rate(r['layer_mix_flops_per_s'])} (others used up to "
              f"{r['max_foreign_cpus'] or 0:.2f} CPUs)", flush=True)
        out["candidates"][name] = r
    if previous is not None:
        best = {}
        for name, r in out["candidates"].items():
            before = previous["candidates"].get(name, {})
            if "per_shape_flops_per_s" in r and "per_shape_flops_per_s" in before:
                best[name] = best_layer_mix(c, before, r)
        out["layer_mix_best_of_both"] = best
        out["best"] = max(best, key=best.get) if best else None
        out["reference_flops_per_s"] = best[out["best"]] if best else None
    return out
