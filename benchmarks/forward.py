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

The FLOP rates are compared with the machine's fp32 (fp16 on CUDA) ``F.linear`` rate at
the model's GEMM shapes, measured in the same run, before and after the forwards; on CUDA
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
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.measure import (  # noqa: F401  (device_description, git_commit, slug: also load.py's)
    GiB,
    MachineLoad,
    PeakMemory,
    best_layer_mix,
    cpu_facts,
    cuda_facts,
    device_description,
    fmt_rate,
    fmt_s,
    gemm_rate,
    git_commit,
    slug,
    summarize,
    sync,
    time_runs,
    wait_quiet,
)
from benchmarks.probes import (
    TARGET_MEMORY_HEADROOM,
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
from rerank_kernels import ATTENTION_BACKENDS, Ops, available_attention_backends, select_ops
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.engine import model_shapes
from rerank_server.model import CrossEncoder, EncoderConfig, load_cross_encoder

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
H100_PEAK_FLOPS = 800e12  # dense fp16/bf16, GUIDE section 5

# Targets (printed as pass/fail, never adjusted to the result).
TARGET_MIXED_RATIO = 2.0  # ours / HF tokens/s on the mixed workload
TARGET_GEMM_FRACTION = 0.90  # CPU: ours useful FLOP/s / measured F.linear rate
TARGET_RSS_RATIO = 1.3  # CPU: peak RSS of ours / weight bytes
TARGET_UNIFORM_RATIO = 1.3  # CUDA: ours / the fastest HF, uniform workload
TARGET_MFU = 0.60  # CUDA: ours useful FLOP/s / 800 TFLOP/s, uniform (256-token) workload
# CUDA: the memory probe's peak allocation <= weights + probes.TARGET_MEMORY_HEADROOM (2 GiB)
CHECKPOINT_SUFFIX = {torch.float32: "", torch.float16: "-fp16"}  # the CPU's files, CUDA's


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


def ours_backends(ours: CrossEncoder, all_attention: bool, device: torch.device, dtype: torch.dtype) -> list[Backend]:
    """``ours`` as loaded, and with ``all_attention`` a shallow copy (same weights) per other
    available attention backend."""
    nbytes = ours_weight_bytes(ours)
    backends = [Backend("ours", "ours", ours, ours.ops.attention_backend, nbytes)]
    if all_attention:
        for name in available_attention_backends(device, dtype):
            # torch-sdpa on CUDA is the reference (one SDPA call and a host sync per sequence)
            if name != ours.ops.attention_backend and not (device.type == "cuda" and name == "torch-sdpa"):
                variant = copy.copy(ours)
                # as the server would choose with --attention NAME (the GEMMs stay ours', packed at load)
                variant.ops = select_ops(device, name, dtype=dtype, shapes=model_shapes(ours.config))
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
            if device.type == "cuda":  # useful work (the targets) and what the backend executed
                b["mfu_vs_800_tflops"] = b["useful_flops_per_s"] / H100_PEAK_FLOPS
                b["executed_mfu_vs_800_tflops"] = b["executed_flops_per_s"] / H100_PEAK_FLOPS


def backend_entries(entry: dict) -> dict[str, dict]:
    """The per-backend results of a workload entry, in the order they ran."""
    return {k: v for k, v in entry.items() if isinstance(v, dict) and "tokens_per_s" in v}


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
        header += f" {'MFU useful':>10} {'MFU exec':>9} {'peak GiB':>9}"
    print(header)
    for wname, entry in results.items():
        for name, b in backend_entries(entry).items():
            line = (f"{wname:9} {name:{width}} {b['tokens_per_s']:10,.1f} {b['median_s'] * scale:8.2f}"
                    f"{'*' if b['contended'] else ' '} "
                    f"{fmt_rate(b['useful_flops_per_s']):>16} {b['useful_fraction_of_gemm_rate']:8.1%} "
                    f"{fmt_rate(b['executed_flops_per_s']):>16} {b['executed_fraction_of_gemm_rate']:8.1%}")
            if cuda:
                line += (f" {b['mfu_vs_800_tflops']:10.2%} {b['executed_mfu_vs_800_tflops']:9.2%}"
                         f" {b['memory']['own_peak_bytes'] / GiB:9.2f}")
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


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load_ours(checkpoint: Path, ops: Ops, device: torch.device, dtype: torch.dtype) -> CrossEncoder:
    """Our model as the server loads it, with ``ops`` from select_ops at the model's shapes."""
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
        "backends": {b.name: {"kind": b.kind, "attention": b.attention, "weight_bytes": b.weight_bytes,
                              # what the load-time measurement chose for ours, with its timings (CUDA)
                              **({"kernel_choices": b.model.ops.choices} if b.kind == "ours" else {})}
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
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        select_ops(device, args.attention, dtype=dtype)  # checks --attention before any loading
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
    ours = load_ours(checkpoint, select_ops(device, args.attention, dtype=dtype, shapes=model_shapes(config)),
                     device, dtype)
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
