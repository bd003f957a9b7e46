"""Measuring on a shared machine: device facts, timed runs that record how busy the rest of
the machine was, peak CUDA memory, the F.linear rate at the model's GEMM shapes."""
from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from rerank_server.models.encoder import EncoderConfig

REPO = Path(__file__).resolve().parent.parent
GiB = 2 ** 30
CUDA_GEMM_CALLS = 20  # F.linear calls per timed GEMM run on CUDA (one is ~0.1 ms: below the timer's noise)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_facts() -> dict:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": psutil.virtual_memory().total,
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8")
                 if f in flags],
    }


def cuda_facts(device: torch.device) -> dict:
    p = torch.cuda.get_device_properties(device)
    return {"cuda": torch.version.cuda, "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count, "memory_bytes": p.total_memory}


def git_commit() -> dict:
    """Read-only git queries: the commit, and whether the benchmarked code differs from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if os.environ.get("BENCH_COMMIT"):  # a copied tree without .git (the device machine): told by the caller
        return {"commit": os.environ["BENCH_COMMIT"], "tree_differs_from_commit": None}
    if shutil.which("git") is None:  # a bare GPU machine: the results must still be written
        return {"commit": None, "tree_differs_from_commit": None}
    head = git("rev-parse", "HEAD")
    git("update-index", "-q", "--refresh")  # stale stat data in the index would read as changes
    # the code only: results files written meanwhile do not make a run's code differ
    dirty = git("diff-index", "--quiet", "HEAD", "--", "server", "kernels", "benchmarks",
                ":(exclude)benchmarks/results")
    return {"commit": head.stdout.strip() if head.returncode == 0 else None,
            "tree_differs_from_commit": dirty.returncode == 1}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MachineLoad:
    """How much CPU the rest of the machine used while we ran: busy time of all CPUs from
    ``/proc/stat`` (steal included) less this process's own (``os.times``), per second of
    wall time. Other processes on a shared 2-core machine halve a 2-thread GEMM's rate, so
    every timed run records it and runs above ``CONTENDED_SHARE`` of the machine are flagged.
    ``measured``: other processes whose CPU is part of what is timed (a server under test)."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    CPUS = os.cpu_count() or 1
    CONTENDED_SHARE = 0.10

    @classmethod
    def machine_busy_s(cls) -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(v) - v[3] - v[4]) / cls.HZ  # all but idle and iowait

    def __init__(self, measured: tuple = ()):
        self.measured = measured  # psutil.Process objects

    def measured_cpu_s(self) -> float:
        return sum(c.user + c.system for c in (p.cpu_times() for p in self.measured))

    def __enter__(self) -> MachineLoad:
        self.m0, self.t0, self.w0 = self.machine_busy_s(), os.times(), time.perf_counter()
        self.p0 = self.measured_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        t1, m1 = os.times(), self.machine_busy_s()
        self.ours_cpus = (t1.user + t1.system - self.t0.user - self.t0.system
                          + self.measured_cpu_s() - self.p0) / self.wall
        self.foreign_cpus = (None if m1 is None or self.m0 is None
                             else max((m1 - self.m0) / self.wall - self.ours_cpus, 0.0))

    @property
    def contended(self) -> bool:
        return self.foreign_cpus is not None and self.foreign_cpus > self.CONTENDED_SHARE * self.CPUS


def wait_quiet(max_wait_s: float) -> dict:
    """Sleeps in 1 s windows until the rest of the machine uses under CONTENDED_SHARE of it,
    for at most ``max_wait_s``; returns how long it waited and the last window's load."""
    t0, foreign = time.perf_counter(), None
    while max_wait_s > 0:
        with MachineLoad() as load:
            time.sleep(1.0)
        foreign = load.foreign_cpus
        if foreign is None or not load.contended or time.perf_counter() - t0 >= max_wait_s:
            break
    return {"waited_s": time.perf_counter() - t0, "foreign_cpus_before": foreign}


def time_runs(fn, repeats: int, device: torch.device, quiet_wait_s: float = 0.0, extra_runs: int = 0) -> list[dict]:
    """``repeats`` timed calls (synchronize + perf_counter on CUDA), each after waiting
    (bounded) for a quiet machine, plus up to ``extra_runs`` more while fewer than
    ``repeats`` of them ran uncontended."""
    runs = []
    while len(runs) < repeats or (len(runs) < repeats + extra_runs
                                  and sum(not r["contended"] for r in runs) < repeats):
        waited = wait_quiet(quiet_wait_s)
        sync(device)
        with MachineLoad() as load:
            fn()
            sync(device)
        runs.append({"s": load.wall, "foreign_cpus": load.foreign_cpus, "ours_cpus": load.ours_cpus,
                     "contended": load.contended, **waited})
    return runs


def summarize(runs: list[dict]) -> dict:
    """Median of all runs, and of the uncontended ones; the latter is the figure used where
    there is at least one."""
    clean = [r["s"] for r in runs if not r["contended"]]
    all_median = statistics.median(r["s"] for r in runs)
    return {"median_all_s": all_median, "clean_runs": len(clean),
            "median_clean_s": statistics.median(clean) if clean else None,
            "min_s": min(r["s"] for r in runs),
            "median_s": statistics.median(clean) if clean else all_median,
            "contended": not clean}


class PeakMemory:
    """Peak CUDA memory over a block: ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``, and what was allocated before it (``result`` is None on the CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.result = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"baseline_allocated_bytes": self.baseline, "peak_allocated_bytes": peak,
                           "peak_above_baseline_bytes": peak - self.baseline,
                           "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}


def gemm_rate(c: EncoderConfig, m: int, dtype: torch.dtype, device: torch.device, repeats: int,
              quiet_wait_s: float = 0.0, build=None) -> dict:
    """One GEMM candidate (default ``F.linear`` with bias, as the model calls it; see
    benchmarks.gemm) at the model's GEMM shapes with ``m`` rows. The aggregate is one encoder
    layer's mix: total FLOPs / total median time. On CUDA each timed run makes ``CUDA_GEMM_CALLS`` calls."""
    H, FF = c.hidden_size, c.intermediate_size
    shapes = [("qkv", H, 3 * H), ("attn_out", H, H), ("ffn_up", H, FF), ("ffn_down", FF, H)]
    calls = CUDA_GEMM_CALLS if device.type == "cuda" else 1
    g = torch.Generator(device="cpu").manual_seed(1)
    per_shape, flops_sum, time_sum, loads = {}, 0.0, 0.0, []
    with torch.inference_mode():
        for name, k, n in shapes:
            if build is None:
                x = torch.randn(m, k, generator=g).to(device, dtype)
                w = (torch.randn(n, k, generator=g) * 0.02).to(device, dtype)
                b = torch.randn(n, generator=g).to(device, dtype)
                run = functools.partial(F.linear, x, w, b)
            else:
                run = build(k, n, m, dtype, device, g)
            run()  # warm-up
            wait_quiet(quiet_wait_s)

            def linear_calls(run=run):
                for _ in range(calls):
                    run()
            runs = time_runs(linear_calls, repeats, device)
            t = summarize(runs)["median_s"] / calls
            loads += [r["foreign_cpus"] or 0.0 for r in runs]
            flops = 2.0 * m * k * n
            per_shape[f"{name} {m}x{k}->{n}"] = flops / t
            flops_sum += flops
            time_sum += t
    return {"m": m, "per_shape_flops_per_s": per_shape, "layer_mix_flops_per_s": flops_sum / time_sum,
            "max_foreign_cpus": max(loads) if loads else None, "calls_per_run": calls}


def best_layer_mix(c: EncoderConfig, *measurements: dict) -> float:
    """One layer's GEMM mix timed at each shape's best rate over the measurements."""
    H, FF = c.hidden_size, c.intermediate_size
    flops = {"qkv": 3 * H * H, "attn_out": H * H, "ffn_up": H * FF, "ffn_down": FF * H}
    time_sum = 0.0
    for name, f in flops.items():
        best = max(v for m in measurements for k, v in m["per_shape_flops_per_s"].items() if k.startswith(name + " "))
        time_sum += f / best
    return sum(flops.values()) / time_sum


def fmt_rate(x: float) -> str:
    return f"{x / 1e9:,.1f} GFLOP/s" if x < 1e12 else f"{x / 1e12:,.1f} TFLOP/s"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"

