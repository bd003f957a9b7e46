"""Forward-pass benchmark: our unpadded XLM-RoBERTa forward against Hugging Face's padded one.

    python -m benchmarks.forward                  # CPU, full-size random-weight model
    python -m benchmarks.forward --quick          # tiny model, seconds: a smoke test
    python -m benchmarks.forward --device cuda    # fp16, MFU against 800 TFLOP/s, GPU memory
    python -m benchmarks.forward --device cuda --all-attention   # ours once per attention backend
    python -m benchmarks.forward --profile        # plus a per-op breakdown of our forward

Every backend runs the same random-weight checkpoint (bge-reranker-v2-m3 shapes, cached
under checkpoints/full-random, fp32; on CUDA checkpoints/full-random-fp16, the same values
rounded as the fp16 model would round them, written in half the time) on the same token ids:

- *uniform*: every document ``--uniform-len`` (256) tokens;
- *mixed*: lognormal lengths (median 192, sigma 0.9, seed 0) clipped to 16..2048;
- *long*: ``--long-docs`` x ``--long-len`` tokens (CUDA default 16 x 4096);
- *latency*: one request of ``--latency-docs`` (100) mixed-length documents, timed
  ``--latency-repeats`` times (median and p90); ours runs it as a single forward.

The CPU runs uniform and mixed with 16 documents each; CUDA all four, with 128 documents.

Backends: *ours* (the best attention backend of ``rerank_kernels.available_attention_backends``,
or ``--attention NAME``; ``--all-attention`` adds ``ours:NAME`` for every other available
one, the same weights with other ops) and Hugging Face
(``XLMRobertaForSequenceClassification``): *hf* with SDPA attention and, where the
``flash_attn`` package imports on CUDA, *hf-fa2* with ``flash_attention_2`` (the best HF
offers; otherwise the output says SDPA is HF's best here). HF runs the documents in
micro-batches of ``--hf-batch-size`` in arrival order, each padded to its longest member
with an attention mask, as a naive server does. Ours concatenates all tokens into
unpadded batches of up to ``--max-batch-tokens`` tokens, one forward each.

FLOPs ("useful work", the full-model formula of GUIDE section 5, counted on real tokens):
``2 * matmul_params * tokens + 4 * layers * hidden * sum(len^2)``. Our forward executes a
little less (its last layer computes queries, attention output and FFN for the first token
of each sequence only); that count is reported beside it as "executed". Hugging Face
executes more (padding); its executed count includes the padded tokens.

The FLOP rates are compared with the machine's fp32 (fp16 on CUDA) ``F.linear`` rate at
the model's GEMM shapes, measured in the same run, before and after the forwards; on CUDA
also with 800 TFLOP/s (MFU). Memory: on the CPU the peak resident set of our model alone
(load + one forward per batch) in a child process (``--rss-probe``), so neither the HF
model nor the parent's buffers count; on CUDA ``torch.cuda.max_memory_allocated`` per
workload and backend, and for one unpadded batch of ``--memory-tokens`` (65536) tokens
of ours, measured before any other model is loaded.

Results go to ``benchmarks/results/<device>-<YYYY-MM-DD>.json``.
"""
from __future__ import annotations

import argparse
import copy
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

from rerank_kernels import ATTENTION_BACKENDS, Ops, available_attention_backends, select_ops
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.model import CrossEncoder, EncoderConfig, load_cross_encoder

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
H100_PEAK_FLOPS = 800e12  # dense fp16/bf16, GUIDE section 5
GiB = 2 ** 30

# Targets (printed as pass/fail, never adjusted to the result).
TARGET_MIXED_RATIO = 2.0  # ours / HF tokens/s on the mixed workload
TARGET_GEMM_FRACTION = 0.90  # CPU: ours useful FLOP/s / measured F.linear rate
TARGET_RSS_RATIO = 1.3  # CPU: peak RSS of ours / weight bytes
TARGET_UNIFORM_RATIO = 1.3  # CUDA: ours / the fastest HF, uniform workload
TARGET_MFU = 0.60  # CUDA: ours useful FLOP/s / 800 TFLOP/s, uniform (256-token) workload
TARGET_MEMORY_HEADROOM = 2 * GiB  # CUDA: peak allocated for --memory-tokens <= weights + this

MIXED_MEDIAN, MIXED_SIGMA, MIN_LEN, MAX_LEN = 192, 0.9, 16, 2048
BOS, EOS, PAD, FIRST_ORDINARY_ID = 0, 2, 1, 4  # <s> <pad> </s> <unk> are 0..3
WORKLOADS = ("uniform", "mixed", "long", "latency")
CHECKPOINT_SUFFIX = {torch.float32: "", torch.float16: "-fp16"}  # the CPU's files, CUDA's
CUDA_GEMM_CALLS = 20  # F.linear calls per timed GEMM run on CUDA (one is ~0.1 ms: below the timer's noise)


# --------------------------------------------------------------------------- setup

def ensure_checkpoint(quick: bool, dtype: torch.dtype = torch.float32) -> Path:
    """The cached random checkpoint (written once through a temporary directory, so a
    half-written one is never reused). fp16 files hold the fp32 ones' values rounded."""
    size = "tiny" if quick else "full"
    path = REPO / "checkpoints" / f"{size}-random{CHECKPOINT_SUFFIX[dtype]}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"writing a random {size} checkpoint to {path} ...", flush=True)
    write_random_checkpoint(tmp, size, seed=0, dtype=dtype)
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


# --------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    name: str
    lengths: list[int]
    docs: list[np.ndarray]  # token ids per document, <s> ... </s>
    description: str
    latency: bool = False  # one request: ours in a single forward, timed --latency-repeats times
    ours_batches: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
    hf_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def hf_padded_tokens(self, batch_size: int) -> int:
        return sum(len(g) * max(g) for g in chunks(self.lengths, batch_size))

    def padding_fraction(self, batch_size: int) -> float:
        return 1.0 - self.tokens / self.hf_padded_tokens(batch_size)

    def pack(self, max_batch_tokens: int, hf_batch_size: int, device: torch.device) -> None:
        self.ours_batches = pack_ours(self.docs, self.ours_max_tokens(max_batch_tokens), device)
        self.hf_batches = pack_hf(self.docs, hf_batch_size, device)

    def ours_max_tokens(self, max_batch_tokens: int) -> int:
        return max(self.tokens, max_batch_tokens) if self.latency else max_batch_tokens


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def make_docs(lengths: list[int], vocab_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    docs = []
    for n in lengths:
        body = rng.integers(FIRST_ORDINARY_ID, vocab_size - 1, size=n - 2)  # excludes <mask> (last id)
        docs.append(np.concatenate([[BOS], body, [EOS]]).astype(np.int64))
    return docs


def mixed_lengths(rng: np.random.Generator, n: int) -> list[int]:
    lengths = np.clip(np.rint(rng.lognormal(math.log(MIXED_MEDIAN), MIXED_SIGMA, n)), MIN_LEN, MAX_LEN)
    return [int(x) for x in lengths]


def mixed_description(n_docs: int, seed: int | str) -> str:
    return (f"{n_docs} docs, lognormal(median {MIXED_MEDIAN}, sigma {MIXED_SIGMA}) clipped to "
            f"{MIN_LEN}..{MAX_LEN}, seed {seed}")


def make_workloads(n_docs: int, vocab_size: int, uniform_len: int, seed: int) -> list[Workload]:
    """uniform and mixed (one generator, in this order of draws: the CPU figures depend on it)."""
    rng = np.random.default_rng(seed)
    uniform = [uniform_len] * n_docs
    mixed = mixed_lengths(rng, n_docs)
    return [
        Workload("uniform", uniform, make_docs(uniform, vocab_size, rng), f"{n_docs} docs x {uniform_len} tokens"),
        Workload("mixed", mixed, make_docs(mixed, vocab_size, rng), mixed_description(n_docs, seed)),
    ]


def make_long_workload(n_docs: int, length: int, vocab_size: int, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 1])
    lengths = [length] * n_docs
    return Workload("long", lengths, make_docs(lengths, vocab_size, rng), f"{n_docs} docs x {length} tokens")


def make_latency_workload(n_docs: int, vocab_size: int, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 2])
    lengths = mixed_lengths(rng, n_docs)
    return Workload("latency", lengths, make_docs(lengths, vocab_size, rng),
                    f"one request: {mixed_description(n_docs, f'({seed}, 2)')}", latency=True)


def lengths_summing_to(total: int, rng: np.random.Generator) -> list[int]:
    """Mixed lengths whose sum is exactly ``total`` (the last one takes the remainder)."""
    lengths, left = [], total
    while left >= MIN_LEN:
        n = min(mixed_lengths(rng, 1)[0], left)
        lengths.append(left if left - n < MIN_LEN else n)
        left -= lengths[-1]
    return lengths


def build_workloads(args: argparse.Namespace, vocab_size: int, device: torch.device) -> list[Workload]:
    names = args.workloads.split(",")
    workloads = [w for w in make_workloads(args.docs, vocab_size, args.uniform_len, args.seed) if w.name in names]
    if "long" in names:
        workloads.append(make_long_workload(args.long_docs, args.long_len, vocab_size, args.seed))
    if "latency" in names:
        workloads.append(make_latency_workload(args.latency_docs, vocab_size, args.seed))
    for w in workloads:
        w.pack(args.max_batch_tokens, args.hf_batch_size, device)
        print(f"workload {w.name}: {w.description}; {w.tokens} real tokens, lengths "
              f"{min(w.lengths)}..{max(w.lengths)} (mean {w.tokens / len(w.lengths):.0f}); "
              f"HF micro-batches of {args.hf_batch_size} in arrival order -> {w.hf_padded_tokens(args.hf_batch_size)} "
              f"padded tokens, padding fraction {w.padding_fraction(args.hf_batch_size):.1%}; "
              f"ours: {len(w.ours_batches)} unpadded batch(es) of <= {w.ours_max_tokens(args.max_batch_tokens)} tokens",
              flush=True)
    return workloads


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

    def __enter__(self) -> "PeakMemory":
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
              quiet_wait_s: float = 0.0) -> dict:
    """``F.linear`` (with bias, as the model calls it) at the model's GEMM shapes with ``m``
    rows. The aggregate is one encoder layer's mix: total FLOPs / total median time.
    On CUDA each timed run makes ``CUDA_GEMM_CALLS`` calls."""
    H, I = c.hidden_size, c.intermediate_size
    shapes = [("qkv", H, 3 * H), ("attn_out", H, H), ("ffn_up", H, I), ("ffn_down", I, H)]
    calls = CUDA_GEMM_CALLS if device.type == "cuda" else 1
    g = torch.Generator(device="cpu").manual_seed(1)
    per_shape, flops_sum, time_sum, loads = {}, 0.0, 0.0, []
    with torch.inference_mode():
        for name, k, n in shapes:
            x = torch.randn(m, k, generator=g).to(device, dtype)
            w = (torch.randn(n, k, generator=g) * 0.02).to(device, dtype)
            b = torch.randn(n, generator=g).to(device, dtype)
            F.linear(x, w, b)  # warm-up
            wait_quiet(quiet_wait_s)

            def linear_calls():
                for _ in range(calls):
                    F.linear(x, w, b)
            runs = time_runs(linear_calls, repeats, device)
            t = summarize(runs)["median_s"] / calls
            loads += [r["foreign_cpus"] or 0.0 for r in runs]
            flops = 2.0 * m * k * n
            per_shape[f"{name} {m}x{k}->{n}"] = flops / t
            flops_sum += flops
            time_sum += t
            del x, w, b
    return {"m": m, "per_shape_flops_per_s": per_shape, "layer_mix_flops_per_s": flops_sum / time_sum,
            "max_foreign_cpus": max(loads) if loads else None, "calls_per_run": calls}


def best_layer_mix(c: EncoderConfig, *measurements: dict) -> float:
    """One layer's GEMM mix timed at each shape's best rate over the measurements."""
    H, I = c.hidden_size, c.intermediate_size
    flops = {"qkv": 3 * H * H, "attn_out": H * H, "ffn_up": H * I, "ffn_down": I * H}
    time_sum = 0.0
    for name, f in flops.items():
        best = max(v for m in measurements for k, v in m["per_shape_flops_per_s"].items() if k.startswith(name + " "))
        time_sum += f / best
    return sum(flops.values()) / time_sum


def measure_gemm(config: EncoderConfig, args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict:
    print(f"GEMM rate (F.linear, {dtype}, M={args.gemm_m}) ...", flush=True)
    result = gemm_rate(config, args.gemm_m, dtype, device, repeats=5, quiet_wait_s=args.quiet_wait)
    for k, v in result["per_shape_flops_per_s"].items():
        print(f"  {k}: {fmt_rate(v)}")
    print(f"  layer mix: {fmt_rate(result['layer_mix_flops_per_s'])} (rest of the machine used up to "
          f"{result['max_foreign_cpus'] or 0:.2f} CPUs meanwhile)", flush=True)
    return result


# --------------------------------------------------------------------------- backends

@dataclass
class Backend:
    """One thing timed: our model with one set of ops, or a Hugging Face model with one
    attention implementation."""
    name: str  # "ours", "ours:<attention>", "hf" (SDPA), "hf-fa2", "hf-<implementation>"
    kind: str  # "ours" or "hf"
    model: object
    attention: str
    weight_bytes: int

    def run(self, w: Workload) -> torch.Tensor:
        if self.kind == "ours":
            return torch.cat([self.model(ids, cu, max_len) for ids, cu, max_len in w.ours_batches])
        with torch.inference_mode():
            return torch.cat([self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
                              for ids, mask in w.hf_batches])

    def executed_flops(self, c: EncoderConfig, w: Workload, hf_batch_size: int) -> float:
        if self.kind == "ours":
            return ours_executed_flops(c, w.lengths)
        return hf_executed_flops(c, w.lengths, hf_batch_size)


def ours_weight_bytes(model: CrossEncoder) -> int:
    return sum(t.numel() * t.element_size() for _, t in model.named_weights())


def ours_backends(ours: CrossEncoder, all_attention: bool, device: torch.device, dtype: torch.dtype) -> list[Backend]:
    """``ours`` as loaded, and with ``all_attention`` a shallow copy (same weights) per other
    available attention backend."""
    nbytes = ours_weight_bytes(ours)
    backends = [Backend("ours", "ours", ours, ours.ops.attention_backend, nbytes)]
    if all_attention:
        for name in available_attention_backends(device, dtype):
            if name != ours.ops.attention_backend:
                variant = copy.copy(ours)
                variant.ops = select_ops(device, name, dtype=dtype)
                backends.append(Backend(f"ours:{name}", "ours", variant, name, nbytes))
    return backends


HF_SHORT_NAMES = {"sdpa": "hf", "flash_attention_2": "hf-fa2"}


def flash_attn_import_error() -> str | None:
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # ImportError, or a build that does not match this torch
        return f"{e.__class__.__name__}: {e}"
    return None


def hf_attn_implementations(requested: str, device: torch.device) -> tuple[list[str], str | None]:
    """(implementations to run, a note on what HF's best attention is here). ``auto``:
    SDPA, plus flash_attention_2 on CUDA where the flash_attn package imports."""
    if requested != "auto":
        return requested.split(","), None
    if device.type != "cuda":
        return ["sdpa"], "flash_attention_2 needs CUDA: SDPA is HF's best attention here"
    reason = flash_attn_import_error()
    if reason is not None:
        return ["sdpa"], (f"the flash_attn package does not import ({reason}): SDPA is HF's best attention "
                          "here; flash_attention_2 not run")
    return ["sdpa", "flash_attention_2"], None


def load_hf(checkpoint: Path, implementation: str, device: torch.device, dtype: torch.dtype) -> Backend:
    from transformers import XLMRobertaForSequenceClassification
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    hf = XLMRobertaForSequenceClassification.from_pretrained(
        checkpoint, attn_implementation=implementation, dtype=dtype).to(device).eval()
    sync(device)
    print(f"loaded HF in {time.perf_counter() - t0:.1f} s (attn_implementation="
          f"{hf.config._attn_implementation})", flush=True)
    nbytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    name = HF_SHORT_NAMES.get(implementation, f"hf-{implementation}")
    return Backend(name, "hf", hf, hf.config._attn_implementation, nbytes)


def hf_backends(checkpoint: Path, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> tuple[list[Backend], list[str]]:
    """HF models (none with --skip-hf) and notes on the implementations not run. SDPA must
    load; another implementation that fails to load is noted and skipped."""
    if args.skip_hf:
        return [], []
    implementations, note = hf_attn_implementations(args.hf_attn, device)
    backends, notes = [], [note] if note else []
    for implementation in implementations:
        try:
            backends.append(load_hf(checkpoint, implementation, device, dtype))
        except Exception as e:
            if implementation == "sdpa":
                raise
            notes.append(f"HF attn_implementation={implementation!r} did not load ({e.__class__.__name__}: {e}); not run")
    for n in notes:
        print(f"note: {n}", flush=True)
    return backends, notes


def warm_up(backends: list[Backend], workloads: list[Workload], args: argparse.Namespace, device: torch.device) -> float:
    """CUDA: one untimed run of every backend on every workload (Triton compiles, cuBLAS
    picks its algorithms per shape). CPU: one forward per backend on the first 4 docs of
    each workload (allocator, BLAS/oneDNN)."""
    t0 = time.perf_counter()
    for w in workloads:
        if device.type != "cuda":
            docs = w.docs[:min(4, len(w.docs))]
            w = Workload(w.name, [len(d) for d in docs], docs, "warm-up slice")
            w.pack(args.max_batch_tokens, args.hf_batch_size, device)
        for b in backends:
            b.run(w)
    sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- measurements

def measure_backend(b: Backend, w: Workload, config: EncoderConfig, args: argparse.Namespace,
                    device: torch.device) -> tuple[dict, torch.Tensor]:
    """Timed runs of one backend on one workload (and its peak CUDA memory): the result
    entry and the logits of the last run."""
    repeats = args.latency_repeats if w.latency else args.repeats
    print(f"{w.name} / {b.name}: {repeats} timed runs ...", flush=True)
    box = {}
    with PeakMemory(device) as memory:
        runs = time_runs(lambda: box.__setitem__("y", b.run(w)), repeats, device, args.quiet_wait,
                         0 if w.latency else args.extra_runs)
    summary = summarize(runs)
    med, times = summary["median_s"], [r["s"] for r in runs]
    executed = b.executed_flops(config, w, args.hf_batch_size)
    useful = useful_flops(config, w.lengths)
    result = {"runs": runs, **summary, "tokens_per_s": w.tokens / med, "useful_flops_per_s": useful / med,
              "executed_flops": executed, "executed_flops_per_s": executed / med}
    if w.latency:
        result["p90_s"] = float(np.percentile(times, 90))
    if memory.result is not None:
        result["memory"] = {**memory.result, "weight_bytes": b.weight_bytes,
                            "own_peak_bytes": b.weight_bytes + memory.result["peak_above_baseline_bytes"]}
    if len(runs) <= 5:
        print("  runs " + ", ".join(f"{fmt_s(r['s'])} (others {r['foreign_cpus'] or 0:.2f} CPUs"
                                    f"{', CONTENDED' if r['contended'] else ''})" for r in runs))
    else:
        print(f"  {len(runs)} runs: min {fmt_s(min(times))}, p90 {fmt_s(float(np.percentile(times, 90)))}, "
              f"max {fmt_s(max(times))}; {sum(r['contended'] for r in runs)} contended")
    print(f"  median {fmt_s(med)} over {summary['clean_runs'] or len(runs)} "
          f"{'uncontended' if summary['clean_runs'] else 'CONTENDED'} run(s) -> "
          f"{w.tokens / med:,.1f} real tokens/s"
          + (f"; peak {result['memory']['own_peak_bytes'] / GiB:.2f} GiB (weights + working memory)"
             if "memory" in result else ""), flush=True)
    return result, box["y"].cpu()


def compare_backends(entry: dict, outputs: dict[str, torch.Tensor]) -> None:
    """Speed ratio and largest logit difference of each backend against ``hf`` (SDPA), and
    of ours against the fastest HF backend (the baseline the targets use)."""
    if "hf" in outputs:
        hf_rate = entry["hf"]["tokens_per_s"]
        for name, y in outputs.items():
            if name != "hf":
                entry[name]["ratio_over_hf"] = entry[name]["tokens_per_s"] / hf_rate
                entry[name]["max_abs_logit_diff_vs_hf"] = float((y - outputs["hf"]).abs().max())
        if "ours" in outputs:
            entry["max_abs_logit_diff_ours_vs_hf"] = entry["ours"]["max_abs_logit_diff_vs_hf"]
            entry["ratio_ours_over_hf"] = entry["ours"]["ratio_over_hf"]
    hf_names = [n for n in outputs if n == "hf" or n.startswith("hf-")]
    if hf_names and "ours" in outputs:
        best = max(hf_names, key=lambda n: entry[n]["tokens_per_s"])
        entry["best_hf"] = best
        entry["ratio_ours_over_best_hf"] = entry["ours"]["tokens_per_s"] / entry[best]["tokens_per_s"]


def measure_workload(w: Workload, backends: list[Backend], config: EncoderConfig, args: argparse.Namespace,
                     device: torch.device) -> dict:
    entry = {"description": w.description, "docs": len(w.lengths), "tokens": w.tokens,
             "lengths": w.lengths, "sum_len_squared": sum(n * n for n in w.lengths),
             "hf_batch_size": args.hf_batch_size, "hf_padded_tokens": w.hf_padded_tokens(args.hf_batch_size),
             "padding_fraction": w.padding_fraction(args.hf_batch_size),
             "ours_batches": len(w.ours_batches), "useful_flops": useful_flops(config, w.lengths)}
    if w.latency:
        entry["repeats"] = args.latency_repeats
    outputs = {}
    for b in backends:
        entry[b.name], outputs[b.name] = measure_backend(b, w, config, args, device)
    compare_backends(entry, outputs)
    return entry


def add_rates(results: dict, gemm_ref: float, device: torch.device) -> None:
    for entry in results.values():
        for b in backend_entries(entry).values():
            b["useful_fraction_of_gemm_rate"] = b["useful_flops_per_s"] / gemm_ref
            b["executed_fraction_of_gemm_rate"] = b["executed_flops_per_s"] / gemm_ref
            if device.type == "cuda":
                b["mfu_vs_800_tflops"] = b["useful_flops_per_s"] / H100_PEAK_FLOPS


def backend_entries(entry: dict) -> dict[str, dict]:
    """The per-backend results of a workload entry, in the order they ran."""
    return {k: v for k, v in entry.items() if isinstance(v, dict) and "tokens_per_s" in v}


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
          f"peak reserved {m['peak_reserved_bytes'] / GiB:.2f} GiB; limit {probe['limit_bytes'] / GiB:.2f} GiB", flush=True)


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
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RSS-PROBE "))
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


# --------------------------------------------------------------------------- targets

def cpu_targets(results: dict, rss: dict | None) -> dict:
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
    return targets


def cuda_targets(results: dict, probe: dict | None, uniform_len: int) -> dict:
    """Issue 3's GPU targets: ours against the fastest HF backend of the run (>= 2x on mixed,
    >= 1.3x on uniform), MFU on the uniform workload, and peak memory of the memory probe."""
    targets = {}
    for wname, goal in (("mixed", TARGET_MIXED_RATIO), ("uniform", TARGET_UNIFORM_RATIO)):
        entry = results.get(wname, {})
        if "ratio_ours_over_best_hf" in entry:
            r, best = entry["ratio_ours_over_best_hf"], entry["best_hf"]
            targets[f"{wname}_ours_over_hf>={goal:g}"] = {
                "value": r, "pass": r >= goal, "contended": entry["ours"]["contended"] or entry[best]["contended"],
                "detail": f"against {best} ({entry[best]['tokens_per_s']:,.0f} tokens/s), the fastest HF here"}
    if "uniform" in results:
        ours = results["uniform"]["ours"]
        targets[f"uniform_ours_mfu>={TARGET_MFU:.2f}"] = {
            "value": ours["mfu_vs_800_tflops"], "pass": ours["mfu_vs_800_tflops"] >= TARGET_MFU,
            "contended": ours["contended"], "detail": f"{uniform_len}-token docs, useful FLOPs / 800 TFLOP/s"}
    if probe is not None and probe["memory"] is not None:
        peak = probe["memory"]["peak_allocated_bytes"]
        targets[f"peak_memory_{probe['tokens']}_tokens<=weights+2GiB"] = {
            "value": peak / GiB, "pass": probe["pass"], "contended": False,
            "detail": f"GiB allocated; limit {probe['limit_bytes'] / GiB:.2f} GiB = weights "
                      f"{probe['weight_bytes'] / GiB:.2f} + {TARGET_MEMORY_HEADROOM / GiB:.0f}"}
    return targets


def print_targets(targets: dict) -> None:
    print("targets:")
    for k, v in targets.items():
        note = "  (every run contended by other processes: inconclusive)" if v["contended"] else ""
        detail = f" ({v['detail']})" if v.get("detail") else ""
        print(f"  {verdict(v['pass'])}  {k}: {v['value']:.3f}{detail}{note}")


# --------------------------------------------------------------------------- report

def print_table(results: dict, device: torch.device) -> None:
    cuda = device.type == "cuda"
    width = max([7] + [len(n) for e in results.values() for n in backend_entries(e)])
    scale, unit = (1e3, "ms") if cuda else (1.0, "s")
    header = (f"{'workload':9} {'backend':{width}} {'tokens/s':>10} {'median ' + unit:>9} {'useful':>16} {'of GEMM':>8} "
              f"{'executed':>16} {'of GEMM':>8}")
    if cuda:
        header += f" {'MFU@800T':>9} {'peak GiB':>9}"
    print(header)
    for wname, entry in results.items():
        for name, b in backend_entries(entry).items():
            line = (f"{wname:9} {name:{width}} {b['tokens_per_s']:10,.1f} {b['median_s'] * scale:8.2f}"
                    f"{'*' if b['contended'] else ' '} "
                    f"{fmt_rate(b['useful_flops_per_s']):>16} {b['useful_fraction_of_gemm_rate']:8.1%} "
                    f"{fmt_rate(b['executed_flops_per_s']):>16} {b['executed_fraction_of_gemm_rate']:8.1%}")
            if cuda:
                line += f" {b['mfu_vs_800_tflops']:9.2%} {b['memory']['own_peak_bytes'] / GiB:9.2f}"
            print(line)
        print_comparisons(wname, entry)


def print_comparisons(wname: str, entry: dict) -> None:
    for name, b in backend_entries(entry).items():
        if "p90_s" in b:
            print(f"{wname:9} {name} latency: median {fmt_s(b['median_s'])}, p90 {fmt_s(b['p90_s'])} over "
                  f"{len(b['runs'])} runs ({entry['docs']} docs, {entry['tokens']} tokens, "
                  f"{entry['ours_batches'] if name.startswith('ours') else -(-entry['docs'] // entry['hf_batch_size'])} "
                  f"forward(s))")
    for name, b in backend_entries(entry).items():
        if "ratio_over_hf" in b:
            print(f"{wname:9} {name}/HF = {b['ratio_over_hf']:.2f}x (padding {entry['padding_fraction']:.1%}); "
                  f"max |logit {name} - HF| = {b['max_abs_logit_diff_vs_hf']:.2e}")
    if entry.get("best_hf", "hf") != "hf":
        print(f"{wname:9} ours/{entry['best_hf']} (fastest HF) = {entry['ratio_ours_over_best_hf']:.2f}x")


def print_report(results: dict, gemm: dict, device: torch.device, describe: str, dtype: torch.dtype,
                 args: argparse.Namespace) -> None:
    print()
    print(f"=== {describe}, torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}")
    print(f"GEMM rate (F.linear layer mix, M={args.gemm_m}): before {fmt_rate(gemm['before']['layer_mix_flops_per_s'])}, "
          f"after {fmt_rate(gemm['after']['layer_mix_flops_per_s'])}; reference = "
          f"{fmt_rate(gemm['reference_flops_per_s'])} (each shape at its better measurement)")
    print("times: median of the uncontended runs (the rest of the machine under "
          f"{MachineLoad.CONTENDED_SHARE:.0%} of it), or of all runs, marked *, where every run was contended")
    print("FLOPs: 'useful' = 2 x matmul params x real tokens + 4 x layers x hidden x sum(len^2) (full model, "
          "no padding); ours executes slightly less (last layer: first tokens only), HF more (padding).")
    if device.type == "cuda":
        print("peak GiB: the backend's weights + its forward's peak allocation above what was allocated before "
              "(torch.cuda.max_memory_allocated)")
    print_table(results, device)


def print_rss_and_profile(rss: dict | None, profile: dict | None) -> None:
    if rss is not None:
        print(f"peak RSS of ours: {rss['peak_rss_bytes'] / GiB:.2f} GiB for {rss['weight_bytes'] / GiB:.2f} GiB of "
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


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny model, few docs: a smoke test of this script")
    p.add_argument("--docs", type=int, help="documents of the uniform and mixed workloads "
                                            "(default: 128 on CUDA, 16 on the CPU, 8 quick)")
    p.add_argument("--uniform-len", type=int, default=256, help="tokens per document of the uniform workload")
    p.add_argument("--long-docs", type=int, help="documents of the long workload (default 16 on CUDA, 2 on the CPU)")
    p.add_argument("--long-len", type=int, help="tokens per document of the long workload (default 4096; 512 quick)")
    p.add_argument("--latency-docs", type=int, help="documents of the latency request (default 100; 10 quick)")
    p.add_argument("--latency-repeats", type=int, help="timed runs of the latency request (default 20 on CUDA, "
                                                       "3 on the CPU, 5 quick)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--hf-batch-size", type=int, help="HF micro-batch size (default 16; 4 quick)")
    p.add_argument("--hf-attn", default="auto",
                   help="comma-separated HF attn_implementations to time (default auto: sdpa, plus "
                        "flash_attention_2 on CUDA where the flash_attn package imports)")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="tokens per unpadded forward of ours (the latency request is always one forward)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS,
                   help="our attention backend (default: the best available)")
    p.add_argument("--all-attention", action="store_true",
                   help="also time ours with every other available attention backend")
    p.add_argument("--memory-tokens", type=int,
                   help="tokens of the one-batch memory probe of ours (default 65536 on CUDA, 4096 quick; "
                        "0 = off, the CPU's default)")
    p.add_argument("--repeats", type=int, help="timed repeats per backend and workload; the median is reported (default 3)")
    p.add_argument("--gemm-m", type=int, help="rows of the GEMM-rate measurement (default 4096; 16384 on CUDA)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quiet-wait", type=float,
                   help="before each timed run, wait up to this many seconds for the rest of the machine to "
                        "go quiet (default 60 on the CPU, 0 on CUDA)")
    p.add_argument("--extra-runs", type=int,
                   help="further timed runs allowed while fewer than --repeats ran uncontended (default 2 on the CPU)")
    p.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)} "
                                       "(default: all on CUDA, uniform,mixed on the CPU)")
    p.add_argument("--skip-hf", action="store_true", help="time ours only (no ratio)")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS child process (CPU)")
    p.add_argument("--profile", action="store_true", help="also profile one forward of ours per op")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/<device>-<date>.json)")
    # child mode
    p.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--probe-workload", default="mixed", choices=("uniform", "mixed"),
                   help="workload the RSS probe runs (default mixed)")
    args = p.parse_args(argv)
    cuda, quick = args.device == "cuda", args.quick
    args.workloads = args.workloads or ",".join(WORKLOADS if cuda else ("uniform", "mixed"))
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if args.memory_tokens is not None and 0 < args.memory_tokens < MIN_LEN:
        p.error(f"--memory-tokens must be 0 or at least {MIN_LEN}")
    if unknown:
        p.error(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {','.join(WORKLOADS)}")
    args.docs = args.docs or (8 if quick else 128 if cuda else 16)
    args.long_docs = args.long_docs or (2 if quick or not cuda else 16)
    args.long_len = args.long_len or (512 if quick else 4096)
    args.latency_docs = args.latency_docs or (10 if quick else 100)
    args.latency_repeats = args.latency_repeats or (20 if cuda else 5 if quick else 3)
    if args.memory_tokens is None:
        args.memory_tokens = (4096 if quick else 65536) if cuda else 0
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if cuda or quick else 60.0)
    args.hf_batch_size = args.hf_batch_size or (4 if quick else 16)
    args.repeats = args.repeats or 3
    args.extra_runs = args.extra_runs if args.extra_runs is not None else (0 if cuda or quick else 2)
    args.gemm_m = args.gemm_m or (512 if quick else 16384 if cuda else 4096)
    return args


def fmt_rate(x: float) -> str:
    return f"{x / 1e9:,.1f} GFLOP/s" if x < 1e12 else f"{x / 1e12:,.1f} TFLOP/s"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load_ours(checkpoint: Path, ops: Ops, device: torch.device, dtype: torch.dtype) -> CrossEncoder:
    t0 = time.perf_counter()
    ours = load_cross_encoder(checkpoint, ops, device, dtype)
    sync(device)
    print(f"loaded ours in {time.perf_counter() - t0:.1f} s (attention: {ours.ops.attention_backend}; available: "
          f"{', '.join(available_attention_backends(device, dtype))})", flush=True)
    return ours


def write_record(args: argparse.Namespace, device: torch.device, describe: str, dtype: torch.dtype, checkpoint: Path,
                 config: EncoderConfig, backends: list[Backend], hf_notes: list[str], **parts) -> None:
    date = datetime.date.today().isoformat()
    device_name = slug(describe) if device.type == "cuda" else "cpu-" + slug(describe)
    out = args.out or RESULTS_DIR / f"{device_name}-{date}{'-quick' if args.quick else ''}.json"
    ours = backends[0]
    has_hf = any(b.kind == "hf" for b in backends)
    record = {
        "benchmark": "forward",
        "date": date,
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": {"type": device.type, "description": describe,
                   **(cpu_facts() if device.type == "cpu" else cuda_facts(device))},
        "git": git_commit(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__ if has_hf else None,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "model": {"checkpoint": str(checkpoint.relative_to(REPO)), "layers": config.num_layers,
                  "hidden": config.hidden_size, "ffn": config.intermediate_size, "vocab": config.vocab_size,
                  "matmul_params": matmul_params(config), "weight_bytes": ours.weight_bytes},
        "settings": {"docs": args.docs, "uniform_len": args.uniform_len, "seed": args.seed,
                     "hf_batch_size": args.hf_batch_size, "hf_order": "arrival (not length-sorted)",
                     "hf_attn_implementation": "sdpa", "max_batch_tokens": args.max_batch_tokens,
                     "repeats": args.repeats, "extra_runs": args.extra_runs, "quiet_wait_s": args.quiet_wait,
                     "contended_share": MachineLoad.CONTENDED_SHARE,
                     "warmup": ("one untimed run per backend of each whole workload" if device.type == "cuda" else
                                "one forward per backend on the first 4 docs of each workload"),
                     "attention_backend_ours": ours.attention,
                     "workloads": args.workloads, "long_docs": args.long_docs, "long_len": args.long_len,
                     "latency_docs": args.latency_docs, "latency_repeats": args.latency_repeats,
                     "memory_tokens": args.memory_tokens, "all_attention": args.all_attention,
                     "hf_attn_requested": args.hf_attn},
        "backends": {b.name: {"kind": b.kind, "attention": b.attention, "weight_bytes": b.weight_bytes}
                     for b in backends},
        "hf_notes": hf_notes,
        "flops_definition": "useful = 2*matmul_params*real_tokens + 4*layers*hidden*sum(len^2) (full model; "
                            "our last-layer first-token saving not subtracted); executed = what each backend runs",
        **parts,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} (total {record['wall_s']:.0f} s)")


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
    try:
        ops = select_ops(device, args.attention, dtype=dtype)
    except ValueError as e:
        sys.exit(f"--attention: {e}")
    started = time.perf_counter()

    checkpoint = ensure_checkpoint(args.quick, dtype)
    args.checkpoint = str(checkpoint)
    config = EncoderConfig.from_hf(json.loads((checkpoint / "config.json").read_text()))
    describe = device_description(device)
    print(f"device: {describe} ({args.device}, {dtype}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    print(f"model: {checkpoint.name} ({config.num_layers} layers, hidden {config.hidden_size}, "
          f"FFN {config.intermediate_size}), matmul params {matmul_params(config) / 1e6:.1f}M", flush=True)
    workloads = build_workloads(args, config.vocab_size, device)

    # 1. Peak RSS of our model alone (CPU), in a child process, before this one grows.
    rss = maybe_rss_probe(args, checkpoint, device)
    # 2. GEMM rate at the model's shapes.
    gemm_before = measure_gemm(config, args, dtype, device)
    # 3. Ours, and its memory for one large batch while no other model is loaded.
    ours = load_ours(checkpoint, ops, device, dtype)
    probe = memory_probe(ours, args.memory_tokens, args.seed, device) if args.memory_tokens else None
    if probe is not None:
        print_memory_probe(probe)
    # 4. The other backends, warm-up, timed runs.
    hf, hf_notes = hf_backends(checkpoint, args, device, dtype)
    backends = ours_backends(ours, args.all_attention, device, dtype) + hf
    print(f"warm-up {warm_up(backends, workloads, args, device):.1f} s", flush=True)
    results = {w.name: measure_workload(w, backends, config, args, device) for w in workloads}

    gemm_after = gemm_rate(config, args.gemm_m, dtype, device, repeats=5, quiet_wait_s=args.quiet_wait)
    # The reference takes each shape's better measurement: a slow moment of the machine
    # does not flatter the fraction.
    gemm_ref = best_layer_mix(config, gemm_before, gemm_after)
    add_rates(results, gemm_ref, device)
    gemm = {"before": gemm_before, "after": gemm_after, "reference_flops_per_s": gemm_ref,
            **({"nominal_peak_flops_per_s": H100_PEAK_FLOPS} if device.type == "cuda" else {})}

    profile = None
    if args.profile:
        w = next((w for w in workloads if w.name == "mixed"), workloads[0])
        print(f"profiling one forward of ours ({w.name}, first batch) ...", flush=True)
        wait_quiet(args.quiet_wait)
        profile = profile_ours(ours, w.ours_batches[0], device)

    print_report(results, gemm, device, describe, dtype, args)
    for note in hf_notes:
        print(f"note: {note}")
    if probe is not None:
        print_memory_probe(probe)
    targets = cuda_targets(results, probe, args.uniform_len) if device.type == "cuda" else cpu_targets(results, rss)
    print_targets(targets)
    print_rss_and_profile(rss, profile)
    write_record(args, device, describe, dtype, checkpoint, config, backends, hf_notes,
                 gemm=gemm, workloads=results, memory_probe=probe, rss=rss, targets=targets, profile=profile,
                 wall_s=time.perf_counter() - started)


if __name__ == "__main__":
    main()
