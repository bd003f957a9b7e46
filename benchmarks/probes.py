"""The forward benchmark's memory and profile probes: peak CUDA memory of one large batch,
peak RSS of our model alone in a child process (CPU), a per-op profile of one forward."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks.measure import GiB, MachineLoad, PeakMemory, fmt_s, sync
from benchmarks.workloads import lengths_summing_to, make_docs, make_workloads, pack_ours
from rerank_kernels import Ops, select_ops
from rerank_server.models.encoder import CrossEncoder, load_cross_encoder

REPO = Path(__file__).resolve().parent.parent
TARGET_MEMORY_HEADROOM = 2 * GiB  # CUDA: peak allocated for --memory-tokens <= weights + this


def ours_weight_bytes(model: CrossEncoder) -> int:
    return model.weight_bytes


def memory_probe(model: CrossEncoder, tokens: int, seed: int, device: torch.device) -> dict:
    """Peak CUDA memory of one unpadded forward of ``tokens`` mixed-length tokens with only
    our model loaded (the CPU runs the same forward and measures no memory)."""
    rng = np.random.default_rng([seed, 3])
    lengths = lengths_summing_to(tokens, rng)
    (ids, cu, max_len), = pack_ours(make_docs(lengths, model.config.vocab_size, rng), tokens, device)
    nbytes = ours_weight_bytes(model)
    model(ids, cu, max_len)  # compiles kernels outside the measurement
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        model(ids, cu, max_len)
        sync(device)
        seconds = time.perf_counter() - t0
    out = {"tokens": tokens, "docs": len(lengths), "max_len": max_len, "weight_bytes": nbytes,
           "forward_s": seconds, "tokens_per_s": tokens / seconds, "memory": memory.result,
           "limit_bytes": nbytes + TARGET_MEMORY_HEADROOM}
    if memory.result is not None:
        out["pass"] = memory.result["peak_allocated_bytes"] <= out["limit_bytes"]
    return out


def print_memory_probe(probe: dict) -> None:
    head = (f"memory probe: one unpadded forward of {probe['tokens']} tokens ({probe['docs']} docs, longest "
            f"{probe['max_len']}) in {fmt_s(probe['forward_s'])} ({probe['tokens_per_s']:,.0f} tokens/s)")
    m = probe["memory"]
    if m is None:
        print(f"{head}; peak memory not measured on the CPU", flush=True)
        return
    print(f"{head}; peak allocated {m['peak_allocated_bytes'] / GiB:.2f} GiB (weights "
          f"{probe['weight_bytes'] / GiB:.2f} GiB + {(m['peak_allocated_bytes'] - probe['weight_bytes']) / GiB:.2f}), "
          f"peak reserved {m['peak_reserved_bytes'] / GiB:.2f} GiB; limit {probe['limit_bytes'] / GiB:.2f} GiB",
          flush=True)



# --------------------------------------------------------------------------- RSS probe

def rss_probe(args: argparse.Namespace) -> None:
    """Child process: load ours, run one forward per batch of the mixed workload, print the
    peak resident set as one JSON line. Imports nothing of transformers."""
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    proc = psutil.Process()
    rss_import = proc.memory_info().rss
    path = Path(args.checkpoint)
    model = load_cross_encoder(path, select_ops(device), device, dtype)
    sync(device)
    rss_loaded = proc.memory_info().rss
    peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weight_bytes = ours_weight_bytes(model)
    workload = next(w for w in make_workloads(args.docs, model.config.vocab_size, args.uniform_len, args.seed)
                    if w.name == args.probe_workload)
    batches = pack_ours(workload.docs, args.max_batch_tokens, device)
    for ids, cu, max_len in batches:
        model(ids, cu, max_len)
    sync(device)
    out = {
        "workload": args.probe_workload,
        "tokens": workload.tokens,
        "batches": len(batches),
        "largest_batch_tokens": max(int(ids.shape[0]) for ids, _, _ in batches),
        "weight_bytes": weight_bytes,
        "rss_after_import_bytes": rss_import,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_after_load_bytes": peak_after_load,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    print("RSS-PROBE " + json.dumps(out), flush=True)


def run_rss_probe(args: argparse.Namespace, checkpoint: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.forward", "--rss-probe", "--checkpoint", str(checkpoint),
           "--device", args.device, "--docs", str(args.docs), "--uniform-len", str(args.uniform_len),
           "--seed", str(args.seed), "--max-batch-tokens", str(args.max_batch_tokens),
           "--probe-workload", args.probe_workload]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS probe failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RSS-PROBE "))
    result = json.loads(line.removeprefix("RSS-PROBE "))
    result["seconds"] = time.perf_counter() - t0
    result["peak_over_weights"] = result["peak_rss_bytes"] / result["weight_bytes"]
    result["peak_minus_import_over_weights"] = (
        (result["peak_rss_bytes"] - result["rss_after_import_bytes"]) / result["weight_bytes"])
    return result


def maybe_rss_probe(args: argparse.Namespace, checkpoint: Path, device: torch.device) -> dict | None:
    """The CPU's memory measurement (CUDA measures GPU memory in-process instead)."""
    if args.skip_rss or device.type != "cpu":
        return None
    print("RSS probe (child process: load ours + one forward per batch) ...", flush=True)
    rss = run_rss_probe(args, checkpoint)
    print(f"  peak RSS {rss['peak_rss_bytes'] / GiB:.2f} GiB = {rss['peak_over_weights']:.2f}x weights "
          f"({rss['weight_bytes'] / GiB:.2f} GiB); after import {rss['rss_after_import_bytes'] / GiB:.2f} GiB, "
          f"after load {rss['rss_after_load_bytes'] / GiB:.2f} GiB; excluding the import baseline "
          f"{rss['peak_minus_import_over_weights']:.2f}x ({rss['seconds']:.0f} s)", flush=True)
    return rss



# --------------------------------------------------------------------------- profile

PROFILE_RANGES = ("ops.embed_layernorm", "ops.add_layernorm", "ops.bias_gelu", "ops.varlen_attention")


def profiled_ops(ops: Ops) -> Ops:
    """The same ops, each inside a ``record_function`` range the profiler can total."""
    def wrap(name: str, fn):
        def wrapped(*a, **k):
            with torch.profiler.record_function(f"ops.{name}"):
                return fn(*a, **k)
        return wrapped
    return Ops(embed_layernorm=wrap("embed_layernorm", ops.embed_layernorm),
               add_layernorm=wrap("add_layernorm", ops.add_layernorm),
               bias_gelu=wrap("bias_gelu", ops.bias_gelu),
               varlen_attention=wrap("varlen_attention", ops.varlen_attention),
               attention_backend=ops.attention_backend)


def profile_ours(model: CrossEncoder, batch: tuple[torch.Tensor, torch.Tensor, int], device: torch.device) -> dict:
    """One profiled forward: inclusive time of each ``Ops`` call, self time of the GEMMs
    (``aten::addmm``/``aten::mm``, i.e. the ``F.linear`` calls), and the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile
    ids, cu, max_len = batch
    plain_ops, model.ops = model.ops, profiled_ops(model.ops)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        sync(device)
        t0 = time.perf_counter()
        with MachineLoad() as load, profile(activities=activities) as prof:
            model(ids, cu, max_len)
            sync(device)
        wall = time.perf_counter() - t0
    finally:
        model.ops = plain_ops
    averages = prof.key_averages()
    us = 1e-6

    def total(name: str) -> float:  # inclusive
        return sum(e.cpu_time_total for e in averages if e.key == name) * us

    def self_time(name: str) -> float:
        return sum(e.self_cpu_time_total for e in averages if e.key == name) * us

    categories = {name.removeprefix("ops."): total(name) for name in PROFILE_RANGES}
    categories["gemm (aten::addmm + aten::mm, F.linear)"] = self_time("aten::addmm") + self_time("aten::mm")
    accounted = sum(categories.values())
    profiled_total = sum(e.self_cpu_time_total for e in averages) * us
    categories["other (indexing, views, copies outside ops)"] = max(profiled_total - accounted, 0.0)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "batch_tokens": int(ids.shape[0]),
        "batch_sequences": int(cu.shape[0] - 1),
        "wall_s": wall,
        "foreign_cpus": load.foreign_cpus,
        "profiled_self_total_s": profiled_total,
        "categories_s": categories,
        "categories_fraction": {k: v / profiled_total for k, v in categories.items()},
        "top_self_ops": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total * us,
                          "fraction": e.self_cpu_time_total * us / profiled_total} for e in top],
    }

