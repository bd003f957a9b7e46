"""int8 GEMM candidates at the model's shapes, beside oneDNN fp32 and bf16 (weights reordered
once, as the server's float paths run): GFLOP/s of the GEMM alone (activations already
quantized) and of the whole call the server makes (per-row quantization + GEMM + epilogue:
row scale, bias), for K=1024 -> N=3072/1024/4096 and K=4096 -> N=1024 at M = 2, 64, 512.

    python -m benchmarks.int8_gemm [--threads 1] [--repeats 5] [--out results.json]

Per-tensor activation scales are not candidates (a row's result would depend on its batch).
Every timing records the load of the rest of the machine (MachineLoad); the results file says
whether the run was contended.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.measure import REPO, MachineLoad, cpu_facts, device_description, git_commit, slug
from rerank_kernels.linear_int8 import (
    ACTIVATION_OFFSET,
    ONEDNN_OPS,
    IntMmLinear,
    OneDnnInt8Linear,
    int8_missing,
    onednn_int8_missing,
    quantize_rows,
    quantize_weight,
)

SHAPES = ((1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024))  # (K, N): QKV, attention out, FFN up, down
ROWS = (2, 64, 512)


def candidates(k: int, n: int, m: int, g: torch.Generator) -> dict[str, Callable[[], object]]:
    """name -> a no-argument call of one (m, k) x (k, n) GEMM with bias."""
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    b = torch.randn(n, generator=g)
    found = {}
    w32 = torch.ops.mkldnn._reorder_linear_weight(w, None)
    found["oneDNN fp32 reordered"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w32, b, "none", [], "")
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        xb, bb = x.bfloat16(), b.bfloat16()
        w16 = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None)
        found["oneDNN bf16 reordered"] = lambda: torch.ops.mkldnn._linear_pointwise(xb, w16, bb, "none", [], "")
    qx, _ = quantize_rows(x)
    ux, _ = quantize_rows(x, offset=True)
    qw, sw = quantize_weight(w)
    found["per-row quantization alone"] = lambda: quantize_rows(x, offset=True)
    if onednn_int8_missing() is None:
        packed, zeros = ONEDNN_OPS.qlinear_prepack(qw, None), torch.zeros(n, dtype=torch.int64)
        found["oneDNN int8 qlinear, GEMM only"] = lambda: ONEDNN_OPS.qlinear_pointwise(
            ux, 1.0, ACTIVATION_OFFSET, packed, sw, zeros, None, 1.0, 0, torch.float32, "none", [], "")
        onednn = OneDnnInt8Linear(w, b)
        found["oneDNN int8 qlinear, whole call"] = lambda: onednn(x)
    wt = qw.t()
    found["torch._int_mm, GEMM only"] = lambda: torch._int_mm(qx, wt)
    int_mm = IntMmLinear(w, b)
    found["torch._int_mm, whole call"] = lambda: int_mm(x)
    return found


def measure(fn: Callable[[], object], repeats: int, min_s: float = 0.05) -> dict:
    """Median seconds per call over ``repeats`` runs of enough calls to last ``min_s``."""
    fn()
    started, calls = time.perf_counter(), 0
    while time.perf_counter() - started < min_s / 4 or calls < 1:
        fn()
        calls += 1
    per_run = max(1, int(calls * 4))
    times, foreign = [], []
    for _ in range(repeats):
        with MachineLoad() as load:
            for _ in range(per_run):
                fn()
        times.append(load.wall / per_run)
        foreign.append(load.foreign_cpus)
    known = [f for f in foreign if f is not None]
    return {"s": statistics.median(times), "foreign_cpus": round(statistics.median(known), 2) if known else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    p.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results/...)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    results = []
    for k, n in SHAPES:
        for m in a.rows:
            for name, fn in candidates(k, n, m, g).items():
                r = measure(fn, a.repeats)
                flops = 2 * m * k * n
                row = {"k": k, "n": n, "m": m, "candidate": name, "ms": round(r["s"] * 1e3, 4),
                       "gflops": None if name.startswith("per-row") else round(flops / r["s"] / 1e9, 1),
                       "foreign_cpus": r["foreign_cpus"]}
                results.append(row)
                rate = f"{row['gflops']:8.1f} GFLOP/s" if row["gflops"] else " " * 16
                print(f"K={k:5d} N={n:5d} M={m:4d}  {name:34s} {row['ms']:9.3f} ms {rate}  "
                      f"(rest of machine {r['foreign_cpus']} CPUs)", flush=True)
    loads = [r["foreign_cpus"] for r in results if r["foreign_cpus"] is not None]
    contended = bool(loads) and statistics.median(loads) > MachineLoad.CONTENDED_SHARE * MachineLoad.CPUS
    report = {"benchmark": "int8_gemm", "device": device_description(torch.device("cpu")), "cpu": cpu_facts(),
              "int8_dot_product": int8_missing() or "AVX512_VNNI or AMX present",
              "threads": a.threads, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **git_commit(),
              "machine_load": {"median_foreign_cpus": round(statistics.median(loads), 2) if loads else None,
                               "contended": contended,
                               "note": "measured while other processes used the CPUs: rates are lower bounds"
                                       if contended else "uncontended"},
              "results": results}
    out = a.out or REPO / "benchmarks" / "results" / (
        f"int8-gemm-{slug(report['device'])}-{report['date'][:10]}-{a.threads}thread.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
