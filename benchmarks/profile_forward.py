"""Where the CPU forward's time goes: torch.profiler over our forward, per op kind.

    python -m benchmarks.profile_forward                 # 4 layers at full width, float32 (+ bfloat16 if native)
    python -m benchmarks.profile_forward --layers 24     # the whole bge-reranker-v2-m3 depth (slower)

The model is bge-reranker-v2-m3's width (hidden 1024, 16 heads, FFN 4096) with ``--layers``
layers of random weights and a small vocabulary (the embedding lookup costs the same whatever
the table's size), loaded as the server loads it: ``select_ops`` measures the GEMM library per
kind at these shapes, and the packed GEMMs are the ones profiled. Every GEMM (each packed
linear: QKV, attention output, FFN up with bias and GELU, FFN down, the last layer's
first-token query and K/V, the head) and every op of ``Ops`` runs inside a
``record_function`` range, so the profile splits one forward's time into GEMMs (with their
FLOP rate: FLOPs counted from the shapes of each call), attention (with its rate: 4 x head
dim x heads x the sum over sequences of queries x keys), LayerNorms, embedding, GELU and the
rest (indexing, views, copies between ops). Workloads: the forward benchmark's uniform (16 x 256
tokens) and mixed (16 lognormal lengths) documents, one unpadded batch each, as the scheduler
forms them. Each case: one warm-up forward, ``--repeats`` forwards timed without the profiler,
then ``--repeats`` under it (the breakdown is their sum), after waiting (at most
``--quiet-wait`` seconds) for the rest of the machine to go quiet; the machine's load meanwhile
is recorded (``benchmarks.measure.MachineLoad``).

Results go to ``benchmarks/results/profile-<cpu>-<YYYY-MM-DD>.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.measure import MachineLoad, cpu_facts, device_description, git_commit, slug, wait_quiet
from benchmarks.workloads import make_workloads
from rerank_kernels import select_ops
from rerank_kernels.cpu_memory import keep_freed_memory
from rerank_kernels.int8_rows import QuantizedRows
from rerank_kernels.linear_int8 import Int8Linear
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.config import default_max_batch_tokens
from rerank_server.engine import model_shapes
from rerank_server.models.encoder import CrossEncoder, EncoderConfig, load_cross_encoder

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
GEMMS = ("qkv", "first_token_query", "out", "up", "down")
OPS = ("embed_layernorm", "add_layernorm", "bias_gelu", "varlen_attention")
VOCAB = 8192  # token ids of the workloads are drawn below it


class Tally:
    """FLOPs counted per range name while the profiler runs (from the shapes of each call)."""

    def __init__(self):
        self.flops: dict[str, float] = defaultdict(float)


def timed_gemm(name: str, linear, tally: Tally):
    if isinstance(linear, Int8Linear):
        return timed_int8(name, linear, tally)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function(name):
            y = linear(x)
        tally.flops[name] += 2.0 * x.shape[0] * x.shape[1] * y.shape[-1]
        return y
    return call


def timed_int8(name: str, linear: Int8Linear, tally: Tally) -> Int8Linear:
    """A copy of an int8 GEMM whose every entry (plain call, quantized hand-off, fused LayerNorm)
    runs in the range: the model still sees an Int8Linear, so its fused paths are the ones timed,
    with their glue counted in the GEMM's range."""
    timed = copy.copy(linear)

    def entry(method):
        def call(x, *args, **kwargs):
            with torch.profiler.record_function(name):
                y = method(x, *args, **kwargs)
            rows, cols = (x.q if isinstance(x, QuantizedRows) else x).shape
            tally.flops[name] += 2.0 * rows * cols * linear.out_features
            return y
        return call
    # instance attributes: Int8Linear.__call__ goes through self._run
    timed._run, timed.quantized, timed.add_layernorm = entry(linear._run), entry(linear.quantized), entry(
        linear.add_layernorm)
    return timed


def timed_op(name: str, fn, tally: Tally):
    def call(*args, **kwargs):
        with torch.profiler.record_function(name):
            out = fn(*args, **kwargs)
        if name == "ops.varlen_attention":  # q, k, v (total, heads, dim), cu_q, cu_k, ...
            q, cu_q, cu_k = args[0], args[3], args[4]
            lq, lk = (cu_q[1:] - cu_q[:-1]).double(), (cu_k[1:] - cu_k[:-1]).double()
            tally.flops[name] += 4.0 * q.shape[1] * q.shape[2] * float((lq * lk).sum())
        return out
    return call


def instrument(model: CrossEncoder, tally: Tally) -> None:
    """Every packed GEMM and every ``Ops`` call of ``model`` inside a named profiler range."""
    for layer in model.layers:
        for kind in GEMMS:
            if getattr(layer, kind) is not None:
                setattr(layer, kind, timed_gemm(f"gemm.{kind}", getattr(layer, kind), tally))
    model.head_dense = timed_gemm("gemm.head", model.head_dense, tally)
    model.head_out = timed_gemm("gemm.head", model.head_out, tally)
    model.ops = replace(model.ops, **{op: timed_op(f"ops.{op}", getattr(model.ops, op), tally) for op in OPS})


def profile_case(model: CrossEncoder, batch: tuple, repeats: int, quiet_wait_s: float) -> dict:
    from torch.profiler import ProfilerActivity, profile
    ids, cu, max_len = batch
    model(ids, cu, max_len)  # warm-up
    waited = wait_quiet(quiet_wait_s)
    plain = []
    with MachineLoad() as plain_load:
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, cu, max_len)
            plain.append(time.perf_counter() - t0)
    tally = Tally()
    ops, layers = model.ops, [vars(layer).copy() for layer in model.layers]
    head = model.head_dense, model.head_out
    instrument(model, tally)
    try:
        with MachineLoad() as load, profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                with torch.profiler.record_function("forward"):
                    model(ids, cu, max_len)
    finally:
        model.ops, (model.head_dense, model.head_out) = ops, head
        for layer, saved in zip(model.layers, layers, strict=True):
            vars(layer).update(saved)
    events = prof.key_averages()
    us = 1e-6
    inclusive = {e.key: e.cpu_time_total * us for e in events}
    forward_s = inclusive["forward"]
    names = sorted(n for n in inclusive if n.startswith(("gemm.", "ops.")))
    categories = {n: inclusive[n] for n in names}
    categories["other (indexing, views, copies between ops)"] = max(forward_s - sum(categories.values()), 0.0)
    gemm_s = sum(v for k, v in categories.items() if k.startswith("gemm."))
    gemm_flops = sum(v for k, v in tally.flops.items() if k.startswith("gemm."))
    attention = "ops.varlen_attention"
    top = sorted((e for e in events if e.key != "forward" and not e.key.startswith(("gemm.", "ops."))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "tokens": int(ids.shape[0]), "sequences": int(cu.shape[0] - 1), "repeats": repeats,
        "forward_s_median_unprofiled": statistics.median(plain),
        "tokens_per_s_unprofiled": ids.shape[0] / statistics.median(plain),
        "forward_s_profiled_total": forward_s,
        "profiler_overhead": forward_s / repeats / statistics.median(plain) - 1.0,
        "categories_s": categories,
        "categories_fraction": {k: v / forward_s for k, v in categories.items()},
        "gemm_fraction": gemm_s / forward_s,
        "gemm_flops_per_s": gemm_flops / gemm_s if gemm_s else None,
        "gemm_flops_per_s_by_kind": {k: tally.flops[k] / categories[k] for k in categories
                                     if k.startswith("gemm.") and categories[k] > 0},
        "attention_fraction": categories.get(attention, 0.0) / forward_s,
        "attention_flops_per_s": tally.flops[attention] / categories[attention] if categories.get(attention) else None,
        "top_self_ops_outside_ranges": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total * us}
                                        for e in top],
        "foreign_cpus": load.foreign_cpus, "foreign_cpus_unprofiled": plain_load.foreign_cpus,
        "contended": load.contended or plain_load.contended, **waited,
    }


def native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="encoder layers at full width (default 4)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated float32,bfloat16,int8 (default: float32, and bfloat16 where it is native)")
    p.add_argument("--docs", type=int, default=16, help="documents per workload (default 16, as the forward benchmark)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="seconds to wait at most for a quiet machine before each case (default 60)")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/profile-<cpu>-<date>.json)")
    args = p.parse_args(argv)
    names = args.dtype.split(",") if args.dtype else ["float32"] + (["bfloat16"] if native_bf16() else [])
    device = torch.device("cpu")
    max_batch_tokens = default_max_batch_tokens(False, 0)
    workloads = make_workloads(args.docs, VOCAB, 256, args.seed)
    for w in workloads:
        w.pack(max_batch_tokens, 16, device)
    describe = device_description(device)
    print(f"device: {describe}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.layers} layers at full width; dtypes {', '.join(names)}", flush=True)
    started = time.perf_counter()
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_random_checkpoint(Path(tmp) / "model", "full", seed=args.seed,
                                             num_hidden_layers=args.layers, vocab_size=VOCAB)
        for name in names:
            dtype = DTYPES[name]
            config = json.loads((checkpoint / "config.json").read_text())
            ops = select_ops(device, dtype=dtype, shapes=model_shapes(EncoderConfig.from_hf(config)))
            model = load_cross_encoder(checkpoint, ops, device, dtype)
            keep_freed_memory()  # as Engine.load does on the CPU
            choices = ops.choices.get("cpu_gemm", {})
            for w in workloads:
                if len(w.ours_batches) != 1:
                    raise SystemExit(f"{w.name}: {len(w.ours_batches)} batches; expected one")
                case = profile_case(model, w.ours_batches[0], args.repeats, args.quiet_wait)
                case["gemm_choices"] = choices
                case["workload"] = w.description
                cases[f"{name} {w.name}"] = case
                print_case(f"{name} {w.name}", case)
            del model
    out = args.out or RESULTS_DIR / f"profile-{slug(describe)}-{datetime.date.today()}.json"
    foreign = [c[k] for c in cases.values() for k in ("foreign_cpus", "foreign_cpus_unprofiled")
               if c[k] is not None]
    record = {
        "benchmark": "profile", "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": {"description": describe, **cpu_facts()}, "git": git_commit(), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {"layers": args.layers, "hidden": 1024, "heads": 16, "intermediate": 4096, "vocab": VOCAB,
                  "weights": "random"},
        "machine_load": {"foreign_cpus_max": max(foreign, default=None),
                         "contended": any(c["contended"] for c in cases.values())},
        "cases": cases, "wall_s": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


def print_case(name: str, case: dict) -> None:
    print(f"{name}: {case['tokens']} tokens, {case['sequences']} sequences; "
          f"{case['tokens_per_s_unprofiled']:.0f} tokens/s unprofiled (profiler overhead "
          f"{case['profiler_overhead']:+.0%}); others used {case['foreign_cpus'] or 0:.2f} CPUs", flush=True)
    for k, v in sorted(case["categories_fraction"].items(), key=lambda kv: -kv[1]):
        rate = case["gemm_flops_per_s_by_kind"].get(k) or (case["attention_flops_per_s"]
                                                           if k == "ops.varlen_attention" else None)
        print(f"  {v:6.1%}  {k}" + (f"  {rate / 1e9:.0f} GFLOP/s" if rate else ""))
    print(f"  GEMMs {case['gemm_fraction']:.1%} at {case['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
