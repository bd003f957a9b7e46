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
  ``--latency-repeats`` times (median and p90); ours splits it as the server's scheduler
  does (arrival order, batches of at most ``--max-batch-tokens`` tokens and
  ``MAX_BATCH_PAIRS`` pairs), the batches queued back to back.

The CPU runs uniform and mixed with 16 documents each; CUDA all four, with 128 documents.

On the CPU ours runs once per ``--dtype`` (default float32 and, where the CPU has native bf16,
bfloat16: *ours-bf16*; int8 where it has VNNI or AMX: *ours-int8*), and *onnxruntime* runs the
Hugging Face model exported with ``torch.onnx`` (fp32, cached beside the checkpoint; the ``bench``
extra) one pair at a time: the strongest CPU peer (``--skip-onnx`` leaves it out). ``--peers``
adds benchmarks.peers (onnxruntime int8, OpenVINO f32 and bf16, ...), each in its own process on
each workload's token ids (under ``peers`` in the workload's results; target: ours int8 >= 1.2x
onnxruntime int8).

Backends: *ours* (the best attention backend of ``rerank_kernels.available_attention_backends``,
or ``--attention NAME``; ``--all-attention`` adds ``ours:NAME`` for every other available (on CUDA
but torch-sdpa, the per-sequence reference)
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

The FLOP rates are compared with the best GEMM rate of each backend's dtype at the model's
shapes, measured in the same run before and after the forwards (``benchmarks.gemm``: on the CPU
``F.linear``, oneDNN with the weight reordered once and, fp32, onnxruntime's MatMul); on CUDA
also with 800 TFLOP/s: MFU of the useful FLOPs (the targets) and of the executed ones, side by
side. Memory: on the CPU the peak resident set of our model alone
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.checkpoints import ensure_checkpoint
from benchmarks.forward_summary import (
    H100_PEAK_FLOPS,
    add_rates,
    cpu_targets,
    cuda_targets,
    print_report,
    print_rss_and_profile,
    print_targets,
)
from benchmarks.gemm import measure_candidates
from benchmarks.measure import (
    GiB,
    MachineLoad,
    PeakMemory,
    cpu_facts,
    cuda_facts,
    device_description,
    fmt_s,
    git_commit,
    slug,
    summarize,
    sync,
    time_runs,
    wait_quiet,
)
from benchmarks.onnx_baseline import OnnxPerPair, ensure_onnx, onnx_unavailable_reason
from benchmarks.peers import PEERS, run_peers
from benchmarks.probes import (
    maybe_rss_probe,
    memory_probe,
    ours_weight_bytes,
    print_memory_probe,
    profile_ours,
    rss_probe,
)
from benchmarks.workloads import (
    MIN_LEN,
    WORKLOADS,
    Workload,
    hf_executed_flops,
    make_latency_workload,
    make_long_workload,
    make_workloads,
    matmul_params,
    ours_executed_flops,
    useful_flops,
)
from rerank_kernels import ATTENTION_BACKENDS, Ops, activation_dtype, available_attention_backends, select_ops
from rerank_kernels.cpu_memory import keep_freed_memory
from rerank_kernels.linear_int8 import int8_missing
from rerank_server.engine import model_shapes
from rerank_server.models.encoder import CrossEncoder, EncoderConfig, load_cross_encoder

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}
TARGET_INT8_OVER_ONNX_INT8 = 1.2


# --------------------------------------------------------------------------- workloads and GEMM rate


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
              f"ours: {len(w.ours_batches)} unpadded batch(es) of <= {args.max_batch_tokens} tokens",
              flush=True)
    return workloads


def measure_gemm(config: EncoderConfig, args: argparse.Namespace, device: torch.device,
                 before: dict | None = None) -> dict:
    """The GEMM candidates of every dtype run (benchmarks.gemm); with ``before``, each
    candidate's best of both measurements and each dtype's best candidate."""
    dtypes = dict.fromkeys([DTYPES[d] for d in args.dtypes] + ([torch.float32] if device.type == "cpu" else []))
    return {str(d).removeprefix("torch."): measure_candidates(
        config, args.gemm_m, d, device, 5, args.quiet_wait, None if before is None else
        before[str(d).removeprefix("torch.")]) for d in dtypes}


# --------------------------------------------------------------------------- backends

@dataclass
class Backend:
    """One thing timed: our model with one set of ops, or a Hugging Face model with one
    attention implementation."""
    name: str  # "ours", "ours-bf16", "ours:<attention>", "hf" (SDPA), "hf-fa2", "hf-<implementation>", "onnxruntime"
    kind: str  # "ours", "hf" or "onnxruntime"
    model: object
    attention: str
    weight_bytes: int
    dtype: str = "float32"

    def run(self, w: Workload) -> torch.Tensor:
        if self.kind == "ours":
            return torch.cat([self.model(ids, cu, max_len) for ids, cu, max_len in w.ours_batches])
        if self.kind == "onnxruntime":  # one pair at a time, unpadded
            return self.model(w.docs)
        with torch.inference_mode():
            return torch.cat([self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
                              for ids, mask in w.hf_batches])

    def executed_flops(self, c: EncoderConfig, w: Workload, hf_batch_size: int) -> float:
        if self.kind == "ours":
            return ours_executed_flops(c, w.lengths)
        if self.kind == "onnxruntime":
            return useful_flops(c, w.lengths)
        return hf_executed_flops(c, w.lengths, hf_batch_size)


def ours_backends(ours: CrossEncoder, all_attention: bool, device: torch.device, dtype: torch.dtype,
                  name: str = "ours") -> list[Backend]:
    """``ours`` as loaded (named ``name``), and with ``all_attention`` a shallow copy (same
    weights) per other available attention backend."""
    nbytes = ours_weight_bytes(ours)
    short = str(dtype).removeprefix("torch.")
    backends = [Backend(name, "ours", ours, ours.ops.attention_backend, nbytes, short)]
    if all_attention:
        for name in available_attention_backends(device, dtype):
            # torch-sdpa on CUDA is the reference (one SDPA call and a host sync per sequence)
            if name != ours.ops.attention_backend and not (device.type == "cuda" and name == "torch-sdpa"):
                variant = copy.copy(ours)
                # as the server would choose with --attention NAME (the GEMMs stay ours', packed at load)
                variant.ops = select_ops(device, name, dtype=dtype, shapes=model_shapes(ours.config))
                backends.append(Backend(f"ours:{name}", "ours", variant, name, nbytes, short))
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
    return Backend(name, "hf", hf, hf.config._attn_implementation, nbytes, str(dtype).removeprefix("torch."))


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
            notes.append(f"HF attn_implementation={implementation!r} did not load "
                         f"({e.__class__.__name__}: {e}); not run")
    for n in notes:
        print(f"note: {n}", flush=True)
    return backends, notes


def onnx_backends(checkpoint: Path, args: argparse.Namespace, device: torch.device) -> tuple[list[Backend], list[str]]:
    """onnxruntime fp32 one pair at a time (CPU, unless --skip-onnx), or a note why not."""
    if args.skip_onnx or device.type != "cpu":
        return [], []
    reason = onnx_unavailable_reason()
    if reason is not None:
        note = f"onnxruntime not run: {reason}"
        print(f"note: {note}", flush=True)
        return [], [note]
    path = ensure_onnx(checkpoint)
    t0 = time.perf_counter()
    runner = OnnxPerPair(path, torch.get_num_threads())
    print(f"loaded onnxruntime {runner.version} in {time.perf_counter() - t0:.1f} s ({path})", flush=True)
    nbytes = sum(f.stat().st_size for f in path.parent.iterdir())
    return [Backend("onnxruntime", "onnxruntime", runner, "onnxruntime (fused by its graph optimizer)", nbytes)], []


def warm_up(backends: list[Backend], workloads: list[Workload], args: argparse.Namespace,
            device: torch.device) -> float:
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
    print(f"{w.name} / {b.name} ({b.dtype}): {repeats} timed runs ...", flush=True)
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
    if "onnxruntime" in outputs:
        ort_rate = entry["onnxruntime"]["tokens_per_s"]
        for name, y in outputs.items():
            if name != "onnxruntime":
                entry[name]["ratio_over_onnxruntime"] = entry[name]["tokens_per_s"] / ort_rate
                entry[name]["max_abs_logit_diff_vs_onnxruntime"] = float((y - outputs["onnxruntime"]).abs().max())
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


def measure_peers(results: dict, workloads: list[Workload], checkpoint: Path, args: argparse.Namespace) -> dict:
    """``--peers`` on each workload's token ids (benchmarks.peers: one process each), stored
    under the workload's ``peers`` with ours' ratio over each; -> the int8 targets."""
    names = PEERS if args.peers == "all" else tuple(n for n in args.peers.split(",") if n)
    targets = {}
    for w in workloads if names else []:
        if w.latency:
            continue
        entry = results[w.name]
        peers = run_peers(checkpoint, [d.tolist() for d in w.docs], names, repeats=args.repeats,
                          quiet_wait=args.quiet_wait)
        entry["peers"] = {name: {k: v for k, v in r.items() if k != "logits"} for name, r in peers.items()}
        for name, r in peers.items():
            if "tokens_per_s" in r:
                entry["peers"][name]["ours_over_it"] = {
                    ours: entry[ours]["tokens_per_s"] / r["tokens_per_s"]
                    for ours in ("ours", "ours-fp32", "ours-bf16", "ours-int8") if ours in entry}
        peer = peers.get("onnxruntime-int8", {})
        ours = entry.get("ours" if args.dtypes[0] == "int8" else "ours-int8")
        if ours and "tokens_per_s" in peer:
            ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
            targets[f"{w.name}: ours int8 >= {TARGET_INT8_OVER_ONNX_INT8}x onnxruntime int8"] = {
                "value": ratio, "target": TARGET_INT8_OVER_ONNX_INT8, "pass": ratio >= TARGET_INT8_OVER_ONNX_INT8,
                "contended": ours.get("contended", False) or peer["contended"]}
    return targets


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny model, few docs: a smoke test of this script")
    p.add_argument("--size", default="full", choices=("tiny", "small", "full"),
                   help="the random checkpoint (default full: bge-reranker-v2-m3's shapes; small: 6 x 384)")
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
                   help="tokens per unpadded forward of ours (default 16384, the server's GPU batch budget; "
                        "the latency request is split by it too, as the scheduler splits it)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS,
                   help="our attention backend (default: the best available)")
    p.add_argument("--all-attention", action="store_true",
                   help="also time ours with every other available attention backend (on CUDA not "
                        "torch-sdpa, the per-sequence reference)")
    p.add_argument("--memory-tokens", type=int,
                   help="tokens of the one-batch memory probe of ours (default 65536 on CUDA, 4096 quick; "
                        "0 = off, the CPU's default)")
    p.add_argument("--repeats", type=int,
                   help="timed repeats per backend and workload; the median is reported (default 3)")
    p.add_argument("--gemm-m", type=int, help="rows of the GEMM-rate measurement (default 4096; 16384 on CUDA)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quiet-wait", type=float,
                   help="before each timed run, wait up to this many seconds for the rest of the machine to "
                        "go quiet (default 60 on the CPU, 0 on CUDA)")
    p.add_argument("--extra-runs", type=int,
                   help="further timed runs allowed while fewer than --repeats ran uncontended (default 2 on the CPU)")
    p.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)} "
                                       "(default: all on CUDA, uniform,mixed on the CPU)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes of ours (default on the CPU: float32,bfloat16, bfloat16 only where "
                        "the CPU has native bf16; on CUDA float16)")
    p.add_argument("--skip-hf", action="store_true", help="time ours only (no ratio)")
    p.add_argument("--skip-onnx", action="store_true",
                   help="CPU: leave out onnxruntime (else it needs the bench extra)")
    p.add_argument("--peers", default="", help=f"CPU: 'all' or comma-separated of {', '.join(PEERS)}, each in its "
                                               "own process on the same token ids")
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
    requested = args.dtype.split(",") if args.dtype else None
    if requested is None:
        requested = ["float16"] if cuda else (["float32"] + (["bfloat16"] if native_bf16() else [])
                                              + (["int8"] if int8_missing() is None else []))
    unknown = [d for d in requested if d not in DTYPES]
    if unknown:
        p.error(f"--dtype: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    if not cuda and "float16" in requested:
        p.error("--dtype float16 runs on CUDA only")
    if not cuda and "bfloat16" in requested and not native_bf16():
        p.error("--dtype bfloat16: this CPU has no native bf16 (AVX512_BF16 or AMX)")
    if "int8" in requested and (cuda or int8_missing()):
        p.error(f"--dtype int8 runs on a CPU with int8 dot products: {int8_missing() or 'not on CUDA'}")
    args.dtypes = list(dict.fromkeys(requested))
    return args


def native_bf16() -> bool:
    """The CPU computes bf16 natively (mkldnn's own check is true on any AVX-512 CPU, emulated)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def load_ours(checkpoint: Path, ops: Ops, device: torch.device, dtype: torch.dtype) -> CrossEncoder:
    """Our model as the server loads it, with ``ops`` from select_ops at the model's shapes."""
    t0 = time.perf_counter()
    ours = load_cross_encoder(checkpoint, ops, device, dtype)
    keep_freed_memory()  # as Engine.load does on the CPU
    sync(device)
    print(f"loaded ours ({dtype}) in {time.perf_counter() - t0:.1f} s (attention: {ours.ops.attention_backend}; "
          f"available: {', '.join(available_attention_backends(device, activation_dtype(dtype)))})", flush=True)
    return ours


def write_record(args: argparse.Namespace, device: torch.device, describe: str, checkpoint: Path,
                 config: EncoderConfig, backends: list[Backend], hf_notes: list[str], **parts) -> None:
    date = datetime.date.today().isoformat()
    device_name = slug(describe) if device.type == "cuda" else "cpu-" + slug(describe)
    out = args.out or RESULTS_DIR / f"{device_name}-{date}{'-quick' if args.quick else ''}.json"
    ours = backends[0]
    has_hf = any(b.kind == "hf" for b in backends)
    ort = next((b.model for b in backends if b.kind == "onnxruntime"), None)
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
        "dtype": args.dtypes[0],  # ours; the others: "dtypes" (each backend's: backends.<name>.dtype)
        "dtypes": args.dtypes,
        "onnxruntime": None if ort is None else {"version": ort.version, "model": str(ort.path.relative_to(REPO))
                                                 if ort.path.is_relative_to(REPO) else str(ort.path)},
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
        "backends": {b.name: {"kind": b.kind, "dtype": b.dtype, "attention": b.attention,
                              "weight_bytes": b.weight_bytes,
                              # what the load-time measurement chose for ours, with its timings (CUDA)
                              **({"kernel_choices": getattr(b.model.ops, "choices", None)} if b.kind == "ours" else {})}
                     for b in backends},
        "hf_notes": hf_notes,
        "flops_definition": "useful = 2*matmul_params*real_tokens + 4*layers*hidden*sum(len^2) (full model; "
                            "our last-layer first-token saving not subtracted); executed = what each backend runs",
        **parts,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # default=str: a value JSON lacks is written as text, so the run is not lost
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out} (total {record['wall_s']:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_probe:
        rss_probe(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    dtypes = [DTYPES[d] for d in args.dtypes]
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for d in dtypes:  # checks --attention before any loading
            select_ops(device, args.attention, dtype=d)
    except ValueError as e:
        sys.exit(f"--attention: {e}")
    started = time.perf_counter()

    # the CPU's files are fp32 (bf16 is rounded at load); CUDA's fp16
    checkpoint = ensure_checkpoint("tiny" if args.quick else args.size, torch.float16 if device.type == "cuda" else
                                   torch.float32)
    args.checkpoint = str(checkpoint)
    config = EncoderConfig.from_hf(json.loads((checkpoint / "config.json").read_text()))
    describe = device_description(device)
    print(f"device: {describe} ({args.device}, {', '.join(args.dtypes)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    print(f"model: {checkpoint.name} ({config.num_layers} layers, hidden {config.hidden_size}, "
          f"FFN {config.intermediate_size}), matmul params {matmul_params(config) / 1e6:.1f}M", flush=True)
    workloads = build_workloads(args, config.vocab_size, device)

    # 1. Peak RSS of our model alone (CPU), in a child process, before this one grows.
    rss = maybe_rss_probe(args, checkpoint, device)
    # 2. GEMM rates at the model's shapes, every candidate of every dtype.
    gemm_before = measure_gemm(config, args, device)
    # 3. Ours (once per dtype), and its memory for one large batch while no other model is loaded.
    backends, probe = [], None
    for i, dtype in enumerate(dtypes):
        ours = load_ours(checkpoint, select_ops(device, args.attention, dtype=dtype,
                                                shapes=model_shapes(config)), device, dtype)
        if i == 0 and args.memory_tokens:
            probe = memory_probe(ours, args.memory_tokens, args.seed, device)
            print_memory_probe(probe)
        backends += ours_backends(ours, args.all_attention, device, dtype,
                                  "ours" if i == 0 else f"ours-{SHORT_DTYPE[dtype]}")
    # 4. The other backends, warm-up, timed runs.
    hf, hf_notes = hf_backends(checkpoint, args, device, torch.float16 if device.type == "cuda" else torch.float32)
    onnx, onnx_notes = onnx_backends(checkpoint, args, device)
    backends += hf + onnx
    print(f"warm-up {warm_up(backends, workloads, args, device):.1f} s", flush=True)
    results = {w.name: measure_workload(w, backends, config, args, device) for w in workloads}
    peer_targets = measure_peers(results, workloads, checkpoint, args) if device.type == "cpu" else {}

    gemm = measure_gemm(config, args, device, before=gemm_before)
    # Each dtype's reference: its best candidate, each shape at its better measurement (a slow
    # moment of the machine does not flatter the share).
    refs = {dtype: g["reference_flops_per_s"] for dtype, g in gemm.items()}
    add_rates(results, refs, {b.name: b.dtype for b in backends}, device)
    gemm = {"per_dtype": gemm, "before": gemm_before, "reference_flops_per_s": refs.get(args.dtypes[0]),
            "reference_flops_per_s_by_dtype": refs,
            **({"nominal_peak_flops_per_s": H100_PEAK_FLOPS} if device.type == "cuda" else {})}

    profile = None
    if args.profile:
        w = next((w for w in workloads if w.name == "mixed"), workloads[0])
        print(f"profiling one forward of ours ({w.name}, first batch) ...", flush=True)
        wait_quiet(args.quiet_wait)
        profile = profile_ours(backends[0].model, w.ours_batches[0], device)

    print_report(results, gemm, device, describe, args)
    for note in hf_notes + onnx_notes:
        print(f"note: {note}")
    if probe is not None:
        print_memory_probe(probe)
    targets = cuda_targets(results, probe, args.uniform_len) if device.type == "cuda" else cpu_targets(results, rss)
    targets.update(peer_targets)
    print_targets(targets)
    print_rss_and_profile(rss, profile)
    choices = {b.name: getattr(b.model.ops, "choices", None) for b in backends if b.kind == "ours"}
    choices = {name: c for name, c in choices.items() if c}
    if choices:
        print("op choices made at load: " + json.dumps(choices, default=str))
    write_record(args, device, describe, checkpoint, config, backends, hf_notes + onnx_notes,
                 gemm=gemm, workloads=results, memory_probe=probe, rss=rss, targets=targets, profile=profile,
                 wall_s=time.perf_counter() - started)


if __name__ == "__main__":
    main()
