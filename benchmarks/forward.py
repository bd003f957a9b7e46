"""Forward-pass benchmark: our unpadded XLM-RoBERTa forward against Hugging Face's padded one.

    python -m benchmarks.forward                  # CPU, full-size random-weight model
    python -m benchmarks.forward --quick          # tiny model, seconds: a smoke test
    python -m benchmarks.forward --device cuda    # fp16, MFU against 800 TFLOP/s
    python -m benchmarks.forward --profile        # plus a per-op breakdown of our forward

Both backends run the same random-weight checkpoint (bge-reranker-v2-m3 shapes, cached
under checkpoints/full-random) on the same token ids:

- *uniform*: every document 256 tokens;
- *mixed*: lognormal lengths (median 192, sigma 0.9, seed 0) clipped to 16..2048.

Hugging Face (``XLMRobertaForSequenceClassification``, SDPA attention) runs the documents
in micro-batches of ``--hf-batch-size`` in arrival order, each padded to its longest
member with an attention mask, as a naive server does. Ours concatenates all tokens into
unpadded batches of up to ``--max-batch-tokens`` tokens, one forward each.

FLOPs ("useful work", the full-model formula of GUIDE section 5, counted on real tokens):
``2 * matmul_params * tokens + 4 * layers * hidden * sum(len^2)``. Our forward executes a
little less (its last layer computes queries, attention output and FFN for the first token
of each sequence only); that count is reported beside it as "executed". Hugging Face
executes more (padding); its executed count includes the padded tokens.

The FLOP rates are compared with the machine's fp32 (fp16 on CUDA) ``F.linear`` rate at
the model's GEMM shapes, measured in the same run, before and after the forwards.
Peak resident memory of our model alone (load + one forward per batch) is measured in a
child process (``--rss-probe``), so neither the HF model nor the parent's buffers count.

Results go to ``benchmarks/results/<device>-<YYYY-MM-DD>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from kernels import Ops, select_ops
from server.checkpoint import write_random_checkpoint
from server.model import CrossEncoder, EncoderConfig, load_cross_encoder

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
H100_PEAK_FLOPS = 800e12  # dense fp16/bf16, GUIDE section 5

# Targets (printed as pass/fail, never adjusted to the result).
TARGET_MIXED_RATIO = 2.0  # ours / HF tokens/s on the mixed workload
TARGET_GEMM_FRACTION = 0.90  # ours useful FLOP/s / measured F.linear rate
TARGET_RSS_RATIO = 1.3  # peak RSS of ours / weight bytes

MIXED_MEDIAN, MIXED_SIGMA, MIN_LEN, MAX_LEN = 192, 0.9, 16, 2048
BOS, EOS, PAD, FIRST_ORDINARY_ID = 0, 2, 1, 4  # <s> <pad> </s> <unk> are 0..3


# --------------------------------------------------------------------------- setup

def ensure_checkpoint(quick: bool) -> Path:
    """The cached random checkpoint (written once through a temporary directory, so a
    half-written one is never reused)."""
    size = "tiny" if quick else "full"
    path = REPO / "checkpoints" / f"{size}-random"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"writing a random {size} checkpoint to {path} ...", flush=True)
    write_random_checkpoint(tmp, size, seed=0)
    tmp.rename(path)
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


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
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
    }


def git_commit() -> dict:
    """Read-only git queries: the commit, and whether the benchmarked code differs from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    head = git("rev-parse", "HEAD")
    dirty = git("diff-index", "--quiet", "HEAD", "--", "server", "kernels", "benchmarks")
    return {"commit": head.stdout.strip() if head.returncode == 0 else None,
            "tree_differs_from_commit": dirty.returncode == 1}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    name: str
    lengths: list[int]
    docs: list[np.ndarray]  # token ids per document, <s> ... </s>
    description: str
    ours_batches: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
    hf_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def hf_padded_tokens(self, batch_size: int) -> int:
        return sum(len(g) * max(g) for g in chunks(self.lengths, batch_size))

    def padding_fraction(self, batch_size: int) -> float:
        return 1.0 - self.tokens / self.hf_padded_tokens(batch_size)


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def make_docs(lengths: list[int], vocab_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    docs = []
    for n in lengths:
        body = rng.integers(FIRST_ORDINARY_ID, vocab_size - 1, size=n - 2)  # excludes <mask> (last id)
        docs.append(np.concatenate([[BOS], body, [EOS]]).astype(np.int64))
    return docs


def make_workloads(n_docs: int, vocab_size: int, uniform_len: int, seed: int) -> list[Workload]:
    rng = np.random.default_rng(seed)
    uniform = [uniform_len] * n_docs
    mixed = np.clip(np.rint(rng.lognormal(math.log(MIXED_MEDIAN), MIXED_SIGMA, n_docs)), MIN_LEN, MAX_LEN)
    mixed = [int(x) for x in mixed]
    return [
        Workload("uniform", uniform, make_docs(uniform, vocab_size, rng), f"{n_docs} docs x {uniform_len} tokens"),
        Workload("mixed", mixed, make_docs(mixed, vocab_size, rng),
                 f"{n_docs} docs, lognormal(median {MIXED_MEDIAN}, sigma {MIXED_SIGMA}) clipped to "
                 f"{MIN_LEN}..{MAX_LEN}, seed {seed}"),
    ]


def pack_ours(docs: list[np.ndarray], max_tokens: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Arrival order, greedily into unpadded batches of at most ``max_tokens`` tokens
    (a longer single document gets a batch of its own)."""
    groups: list[list[np.ndarray]] = [[]]
    for d in docs:
        if groups[-1] and sum(map(len, groups[-1])) + len(d) > max_tokens:
            groups.append([])
        groups[-1].append(d)
    batches = []
    for g in groups:
        lengths = [len(d) for d in g]
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = torch.from_numpy(np.concatenate(g)).to(device)
        batches.append((ids, torch.from_numpy(cu).to(device), max(lengths)))
    return batches


def pack_hf(docs: list[np.ndarray], batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Arrival order, micro-batches of ``batch_size`` padded to their longest member."""
    batches = []
    for g in chunks(docs, batch_size):
        width = max(len(d) for d in g)
        ids = torch.full((len(g), width), PAD, dtype=torch.int64)
        mask = torch.zeros((len(g), width), dtype=torch.int64)
        for i, d in enumerate(g):
            ids[i, :len(d)] = torch.from_numpy(d)
            mask[i, :len(d)] = 1
        batches.append((ids.to(device), mask.to(device)))
    return batches


# --------------------------------------------------------------------------- FLOPs

def matmul_params(c: EncoderConfig) -> int:
    """Weights touched per token by the encoder's GEMMs (302M for bge-reranker-v2-m3)."""
    return c.num_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)


def useful_flops(c: EncoderConfig, lengths: list[int]) -> float:
    """GUIDE section 5: the full model on the real tokens, no padding, no last-layer saving."""
    return (2 * matmul_params(c) * sum(lengths)
            + 4 * c.num_layers * c.hidden_size * sum(n * n for n in lengths))


def ours_executed_flops(c: EncoderConfig, lengths: list[int]) -> float:
    """What our forward really runs: L-1 full layers; the last computes K and V for every
    token but Q, attention, output projection and FFN for each first token only; plus the head."""
    H, I, L = c.hidden_size, c.intermediate_size, c.num_layers
    T, B, S2 = sum(lengths), len(lengths), sum(n * n for n in lengths)
    full_layer = 4 * H * H + 2 * H * I
    return (2 * (L - 1) * full_layer * T + 4 * (L - 1) * H * S2
            + 2 * (2 * H * H) * T + 2 * (2 * H * H + 2 * H * I) * B + 4 * H * T
            + 2 * (H * H + H) * B)


def hf_executed_flops(c: EncoderConfig, lengths: list[int], batch_size: int) -> float:
    """Hugging Face runs every padded position through every layer."""
    H, L = c.hidden_size, c.num_layers
    total = 0.0
    for g in chunks(lengths, batch_size):
        w = max(g)
        total += 2 * matmul_params(c) * len(g) * w + 4 * L * H * len(g) * w * w + 2 * (H * H + H) * len(g)
    return total


# --------------------------------------------------------------------------- timing

class MachineLoad:
    """How much CPU the rest of the machine used while we ran: busy time of all CPUs from
    ``/proc/stat`` (steal included) less this process's own (``os.times``), per second of
    wall time. Other processes on a shared 2-core machine halve a 2-thread GEMM's rate, so
    every timed run records it and runs above ``CONTENDED_SHARE`` of the machine are flagged."""

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

    def __enter__(self) -> "MachineLoad":
        self.m0, self.t0, self.w0 = self.machine_busy_s(), os.times(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        t1, m1 = os.times(), self.machine_busy_s()
        self.ours_cpus = (t1.user + t1.system - self.t0.user - self.t0.system) / self.wall
        self.foreign_cpus = None if m1 is None or self.m0 is None else max((m1 - self.m0) / self.wall - self.ours_cpus, 0.0)

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
    """``repeats`` timed calls, each after waiting (bounded) for a quiet machine, plus up to
    ``extra_runs`` more while fewer than ``repeats`` of them ran uncontended."""
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


def gemm_rate(c: EncoderConfig, m: int, dtype: torch.dtype, device: torch.device, repeats: int,
              quiet_wait_s: float = 0.0) -> dict:
    """``F.linear`` (with bias, as the model calls it) at the model's GEMM shapes with ``m``
    rows. The aggregate is one encoder layer's mix: total FLOPs / total median time."""
    H, I = c.hidden_size, c.intermediate_size
    shapes = [("qkv", H, 3 * H), ("attn_out", H, H), ("ffn_up", H, I), ("ffn_down", I, H)]
    g = torch.Generator(device="cpu").manual_seed(1)
    per_shape, flops_sum, time_sum, loads = {}, 0.0, 0.0, []
    with torch.inference_mode():
        for name, k, n in shapes:
            x = torch.randn(m, k, generator=g).to(device, dtype)
            w = (torch.randn(n, k, generator=g) * 0.02).to(device, dtype)
            b = torch.randn(n, generator=g).to(device, dtype)
            F.linear(x, w, b)  # warm-up
            wait_quiet(quiet_wait_s)
            runs = time_runs(lambda: F.linear(x, w, b), repeats, device)
            t = summarize(runs)["median_s"]
            loads += [r["foreign_cpus"] or 0.0 for r in runs]
            flops = 2.0 * m * k * n
            per_shape[f"{name} {m}x{k}->{n}"] = flops / t
            flops_sum += flops
            time_sum += t
            del x, w, b
    return {"m": m, "per_shape_flops_per_s": per_shape, "layer_mix_flops_per_s": flops_sum / time_sum,
            "max_foreign_cpus": max(loads) if loads else None}


def best_layer_mix(c: EncoderConfig, *measurements: dict) -> float:
    """One layer's GEMM mix timed at each shape's best rate over the measurements."""
    H, I = c.hidden_size, c.intermediate_size
    flops = {"qkv": 3 * H * H, "attn_out": H * H, "ffn_up": H * I, "ffn_down": I * H}
    time_sum = 0.0
    for name, f in flops.items():
        best = max(v for m in measurements for k, v in m["per_shape_flops_per_s"].items() if k.startswith(name + " "))
        time_sum += f / best
    return sum(flops.values()) / time_sum


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
    weight_bytes = sum(t.numel() * t.element_size() for _, t in model.named_weights())
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
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RSS-PROBE "))
    result = json.loads(line.removeprefix("RSS-PROBE "))
    result["seconds"] = time.perf_counter() - t0
    result["peak_over_weights"] = result["peak_rss_bytes"] / result["weight_bytes"]
    result["peak_minus_import_over_weights"] = (
        (result["peak_rss_bytes"] - result["rss_after_import_bytes"]) / result["weight_bytes"])
    return result


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


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny model, few docs: a smoke test of this script")
    p.add_argument("--docs", type=int, help="documents per workload (default: 64 on CUDA, 16 on the CPU, 8 quick)")
    p.add_argument("--uniform-len", type=int, default=256, help="tokens per document of the uniform workload")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--hf-batch-size", type=int, help="HF micro-batch size (default 16; 4 quick)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per unpadded forward of ours")
    p.add_argument("--repeats", type=int, help="timed repeats per backend and workload; the median is reported (default 3)")
    p.add_argument("--gemm-m", type=int, help="rows of the GEMM-rate measurement (default 4096; 16384 on CUDA)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quiet-wait", type=float,
                   help="before each timed run, wait up to this many seconds for the rest of the machine to "
                        "go quiet (default 60 on the CPU, 0 on CUDA)")
    p.add_argument("--extra-runs", type=int,
                   help="further timed runs allowed while fewer than --repeats ran uncontended (default 2 on the CPU)")
    p.add_argument("--workloads", default="uniform,mixed", help="comma-separated subset of uniform,mixed")
    p.add_argument("--skip-hf", action="store_true", help="time ours only (no ratio)")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS child process")
    p.add_argument("--profile", action="store_true", help="also profile one forward of ours per op")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/<device>-<date>.json)")
    # child mode
    p.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--probe-workload", default="mixed", choices=("uniform", "mixed"),
                   help="workload the RSS probe runs (default mixed)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.docs = args.docs or (8 if args.quick else 64 if cuda else 16)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if cuda or args.quick else 60.0)
    args.hf_batch_size = args.hf_batch_size or (4 if args.quick else 16)
    args.repeats = args.repeats or 3
    args.extra_runs = args.extra_runs if args.extra_runs is not None else (0 if cuda or args.quick else 2)
    args.gemm_m = args.gemm_m or (512 if args.quick else 16384 if cuda else 4096)
    return args


def fmt_rate(x: float) -> str:
    return f"{x / 1e9:,.1f} GFLOP/s" if x < 1e12 else f"{x / 1e12:,.1f} TFLOP/s"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_probe:
        rss_probe(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    checkpoint = ensure_checkpoint(args.quick)
    args.checkpoint = str(checkpoint)
    config = EncoderConfig.from_hf(json.loads((checkpoint / "config.json").read_text()))
    describe = device_description(device)
    print(f"device: {describe} ({args.device}, {dtype}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    print(f"model: {checkpoint.name} ({config.num_layers} layers, hidden {config.hidden_size}, "
          f"FFN {config.intermediate_size}), matmul params {matmul_params(config) / 1e6:.1f}M", flush=True)

    workloads = [w for w in make_workloads(args.docs, config.vocab_size, args.uniform_len, args.seed)
                 if w.name in args.workloads.split(",")]
    for w in workloads:
        w.ours_batches = pack_ours(w.docs, args.max_batch_tokens, device)
        w.hf_batches = pack_hf(w.docs, args.hf_batch_size, device)
        print(f"workload {w.name}: {w.description}; {w.tokens} real tokens, lengths "
              f"{min(w.lengths)}..{max(w.lengths)} (mean {w.tokens / len(w.lengths):.0f}); "
              f"HF micro-batches of {args.hf_batch_size} in arrival order -> {w.hf_padded_tokens(args.hf_batch_size)} "
              f"padded tokens, padding fraction {w.padding_fraction(args.hf_batch_size):.1%}; "
              f"ours: {len(w.ours_batches)} unpadded batch(es) of <= {args.max_batch_tokens} tokens", flush=True)

    # 1. Peak RSS of our model alone, in a child process, before this one grows.
    rss = None
    if not args.skip_rss:
        print("RSS probe (child process: load ours + one forward per batch) ...", flush=True)
        rss = run_rss_probe(args, checkpoint)
        print(f"  peak RSS {rss['peak_rss_bytes'] / 2**30:.2f} GiB = {rss['peak_over_weights']:.2f}x weights "
              f"({rss['weight_bytes'] / 2**30:.2f} GiB); after import {rss['rss_after_import_bytes'] / 2**30:.2f} GiB, "
              f"after load {rss['rss_after_load_bytes'] / 2**30:.2f} GiB; excluding the import baseline "
              f"{rss['peak_minus_import_over_weights']:.2f}x ({rss['seconds']:.0f} s)", flush=True)

    # 2. GEMM rate at the model's shapes.
    print(f"GEMM rate (F.linear, {dtype}, M={args.gemm_m}) ...", flush=True)
    gemm_before = gemm_rate(config, args.gemm_m, dtype, device, repeats=5, quiet_wait_s=args.quiet_wait)
    for k, v in gemm_before["per_shape_flops_per_s"].items():
        print(f"  {k}: {fmt_rate(v)}")
    print(f"  layer mix: {fmt_rate(gemm_before['layer_mix_flops_per_s'])} (rest of the machine used up to "
          f"{gemm_before['max_foreign_cpus'] or 0:.2f} CPUs meanwhile)", flush=True)

    # 3. Models.
    t0 = time.perf_counter()
    ours = load_cross_encoder(checkpoint, select_ops(device), device, dtype)
    sync(device)
    print(f"loaded ours in {time.perf_counter() - t0:.1f} s (attention: {ours.ops.attention_backend})", flush=True)
    hf = None
    if not args.skip_hf:
        from transformers import XLMRobertaForSequenceClassification
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        t0 = time.perf_counter()
        hf = XLMRobertaForSequenceClassification.from_pretrained(
            checkpoint, attn_implementation="sdpa", dtype=dtype).to(device).eval()
        sync(device)
        print(f"loaded HF in {time.perf_counter() - t0:.1f} s (attn_implementation="
              f"{hf.config._attn_implementation})", flush=True)

    def run_ours(w: Workload) -> torch.Tensor:
        return torch.cat([ours(ids, cu, max_len) for ids, cu, max_len in w.ours_batches])

    def run_hf(w: Workload) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([hf(input_ids=ids, attention_mask=mask).logits[:, 0].float()
                              for ids, mask in w.hf_batches])

    # Warm-up on a small slice of each workload (allocator, BLAS/oneDNN and CUDA kernels).
    t0 = time.perf_counter()
    for w in workloads:
        small = w.docs[:min(4, len(w.docs))]
        for ids, cu, max_len in pack_ours(small, args.max_batch_tokens, device):
            ours(ids, cu, max_len)
        if hf is not None:
            with torch.inference_mode():
                for ids, mask in pack_hf(small, args.hf_batch_size, device):
                    hf(input_ids=ids, attention_mask=mask)
    sync(device)
    print(f"warm-up {time.perf_counter() - t0:.1f} s", flush=True)

    gemm_peak_ref = gemm_before["layer_mix_flops_per_s"]
    results = {}
    for w in workloads:
        entry = {"description": w.description, "docs": len(w.lengths), "tokens": w.tokens,
                 "lengths": w.lengths, "sum_len_squared": sum(n * n for n in w.lengths),
                 "hf_batch_size": args.hf_batch_size, "hf_padded_tokens": w.hf_padded_tokens(args.hf_batch_size),
                 "padding_fraction": w.padding_fraction(args.hf_batch_size),
                 "ours_batches": len(w.ours_batches), "useful_flops": useful_flops(config, w.lengths)}
        outputs = {}
        backends = [("ours", run_ours, ours_executed_flops(config, w.lengths))]
        if hf is not None:
            backends.append(("hf", run_hf, hf_executed_flops(config, w.lengths, args.hf_batch_size)))
        for name, fn, executed in backends:
            print(f"{w.name} / {name}: {args.repeats} timed runs ...", flush=True)
            box = {}
            runs = time_runs(lambda: box.__setitem__("y", fn(w)), args.repeats, device, args.quiet_wait,
                             args.extra_runs)
            outputs[name] = box["y"].cpu()
            summary = summarize(runs)
            med = summary["median_s"]
            entry[name] = {
                "runs": runs, **summary, "tokens_per_s": w.tokens / med,
                "useful_flops_per_s": entry["useful_flops"] / med,
                "executed_flops": executed, "executed_flops_per_s": executed / med,
            }
            print("  runs " + ", ".join(f"{r['s']:.2f} s (others {r['foreign_cpus'] or 0:.2f} CPUs"
                                        f"{', CONTENDED' if r['contended'] else ''})" for r in runs))
            print(f"  median {med:.2f} s over {summary['clean_runs'] or len(runs)} "
                  f"{'uncontended' if summary['clean_runs'] else 'CONTENDED'} run(s) -> "
                  f"{w.tokens / med:,.1f} real tokens/s", flush=True)
        if "hf" in outputs:
            entry["max_abs_logit_diff_ours_vs_hf"] = float((outputs["ours"] - outputs["hf"]).abs().max())
            entry["ratio_ours_over_hf"] = entry["ours"]["tokens_per_s"] / entry["hf"]["tokens_per_s"]
        results[w.name] = entry

    gemm_after = gemm_rate(config, args.gemm_m, dtype, device, repeats=5, quiet_wait_s=args.quiet_wait)
    # The reference takes each shape's better measurement: a slow moment of the machine
    # does not flatter the fraction.
    gemm_ref = best_layer_mix(config, gemm_before, gemm_after)
    for entry in results.values():
        for name in ("ours", "hf"):
            if name in entry:
                b = entry[name]
                b["useful_fraction_of_gemm_rate"] = b["useful_flops_per_s"] / gemm_ref
                b["executed_fraction_of_gemm_rate"] = b["executed_flops_per_s"] / gemm_ref
                if device.type == "cuda":
                    b["mfu_vs_800_tflops"] = b["useful_flops_per_s"] / H100_PEAK_FLOPS

    profile = None
    if args.profile:
        w = next((w for w in workloads if w.name == "mixed"), workloads[0])
        print(f"profiling one forward of ours ({w.name}, first batch) ...", flush=True)
        wait_quiet(args.quiet_wait)
        profile = profile_ours(ours, w.ours_batches[0], device)

    # ------------------------------------------------------------------ report
    print()
    print(f"=== {describe}, torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}")
    print(f"GEMM rate (F.linear layer mix, M={args.gemm_m}): before {fmt_rate(gemm_peak_ref)}, after "
          f"{fmt_rate(gemm_after['layer_mix_flops_per_s'])}; reference = {fmt_rate(gemm_ref)} "
          "(each shape at its better measurement)")
    print("times: median of the uncontended runs (the rest of the machine under "
          f"{MachineLoad.CONTENDED_SHARE:.0%} of it), or of all runs, marked *, where every run was contended")
    print("FLOPs: 'useful' = 2 x matmul params x real tokens + 4 x layers x hidden x sum(len^2) (full model, "
          "no padding); ours executes slightly less (last layer: first tokens only), HF more (padding).")
    header = f"{'workload':9} {'backend':7} {'tokens/s':>10} {'median s':>9} {'useful':>16} {'of GEMM':>8} {'executed':>16} {'of GEMM':>8}"
    if device.type == "cuda":
        header += f" {'MFU@800T':>9}"
    print(header)
    for wname, entry in results.items():
        for name in ("ours", "hf"):
            if name not in entry:
                continue
            b = entry[name]
            line = (f"{wname:9} {name:7} {b['tokens_per_s']:10,.1f} {b['median_s']:8.2f}{'*' if b['contended'] else ' '} "
                    f"{fmt_rate(b['useful_flops_per_s']):>16} {b['useful_fraction_of_gemm_rate']:8.1%} "
                    f"{fmt_rate(b['executed_flops_per_s']):>16} {b['executed_fraction_of_gemm_rate']:8.1%}")
            if device.type == "cuda":
                line += f" {b['mfu_vs_800_tflops']:9.2%}"
            print(line)
        if "ratio_ours_over_hf" in entry:
            print(f"{wname:9} ours/HF = {entry['ratio_ours_over_hf']:.2f}x (padding {entry['padding_fraction']:.1%}); "
                  f"max |logit ours - HF| = {entry['max_abs_logit_diff_ours_vs_hf']:.2e}")

    targets = {}
    if "mixed" in results and "ratio_ours_over_hf" in results["mixed"]:
        m = results["mixed"]
        r = m["ratio_ours_over_hf"]
        targets["mixed_ours_over_hf>=2"] = {"value": r, "pass": r >= TARGET_MIXED_RATIO,
                                            "contended": m["ours"]["contended"] or m["hf"]["contended"]}
    for wname, entry in results.items():
        f = entry["ours"]["useful_fraction_of_gemm_rate"]
        targets[f"{wname}_ours_useful_fraction_of_gemm>=0.90"] = {
            "value": f, "pass": f >= TARGET_GEMM_FRACTION, "contended": entry["ours"]["contended"]}
    if rss is not None:
        targets["peak_rss<=1.3x_weights"] = {"value": rss["peak_over_weights"],
                                             "pass": rss["peak_over_weights"] <= TARGET_RSS_RATIO, "contended": False}
    print("targets:")
    for k, v in targets.items():
        note = "  (every run contended by other processes: inconclusive)" if v["contended"] else ""
        print(f"  {verdict(v['pass'])}  {k}: {v['value']:.3f}{note}")
    if rss is not None:
        print(f"peak RSS of ours: {rss['peak_rss_bytes'] / 2**30:.2f} GiB for {rss['weight_bytes'] / 2**30:.2f} GiB of "
              f"weights ({rss['peak_over_weights']:.2f}x; {rss['peak_minus_import_over_weights']:.2f}x above the "
              f"{rss['rss_after_import_bytes'] / 2**20:.0f} MiB import baseline), {rss['workload']} workload, "
              f"largest batch {rss['largest_batch_tokens']} tokens")
    if profile is not None:
        print(f"profile of one forward of ours ({profile['batch_tokens']} tokens, {profile['batch_sequences']} "
              f"sequences, {profile['wall_s']:.2f} s wall under the profiler, others used "
              f"{profile['foreign_cpus'] or 0:.2f} CPUs meanwhile):")
        for k, v in sorted(profile["categories_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {v:8.3f} s {profile['categories_fraction'][k]:6.1%}  {k}")
        print("  top ops by self time:")
        for e in profile["top_self_ops"]:
            print(f"  {e['self_s']:8.3f} s {e['fraction']:6.1%}  {e['op']} x{e['calls']}")

    date = datetime.date.today().isoformat()
    device_name = slug(describe) if device.type == "cuda" else "cpu-" + slug(describe)
    out = args.out or RESULTS_DIR / f"{device_name}-{date}{'-quick' if args.quick else ''}.json"
    record = {
        "benchmark": "forward",
        "date": date,
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": {"type": device.type, "description": describe,
                   **(cpu_facts() if device.type == "cpu" else {"cuda": torch.version.cuda})},
        "git": git_commit(),
        "torch": torch.__version__,
        "transformers": None if hf is None else __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "model": {"checkpoint": str(checkpoint.relative_to(REPO)), "layers": config.num_layers,
                  "hidden": config.hidden_size, "ffn": config.intermediate_size, "vocab": config.vocab_size,
                  "matmul_params": matmul_params(config),
                  "weight_bytes": sum(t.numel() * t.element_size() for _, t in ours.named_weights())},
        "settings": {"docs": args.docs, "uniform_len": args.uniform_len, "seed": args.seed,
                     "hf_batch_size": args.hf_batch_size, "hf_order": "arrival (not length-sorted)",
                     "hf_attn_implementation": "sdpa", "max_batch_tokens": args.max_batch_tokens,
                     "repeats": args.repeats, "extra_runs": args.extra_runs, "quiet_wait_s": args.quiet_wait,
                     "contended_share": MachineLoad.CONTENDED_SHARE, "warmup": "one forward per backend on the first 4 docs of each workload",
                     "attention_backend_ours": ours.ops.attention_backend},
        "flops_definition": "useful = 2*matmul_params*real_tokens + 4*layers*hidden*sum(len^2) (full model; "
                            "our last-layer first-token saving not subtracted); executed = what each backend runs",
        "gemm": {"before": gemm_before, "after": gemm_after, "reference_flops_per_s": gemm_ref,
                 **({"nominal_peak_flops_per_s": H100_PEAK_FLOPS} if device.type == "cuda" else {})},
        "workloads": results,
        "rss": rss,
        "targets": targets,
        "profile": profile,
        "wall_s": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} (total {record['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
