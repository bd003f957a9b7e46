"""Ours int8 against onnxruntime int8 in alternating rounds, for a machine others share.

On a contended machine a peer timed ten minutes after ours meets another load (benchmarks.peers
runs each peer in turn): the ratio then measures the neighbours. Here the two alternate, round by
round, on the same token ids (the forward benchmark's uniform and mixed workloads), each on
``--threads`` threads (default one), and every round records its wall time and the CPU time the
process got; the figures are the medians of the per-round ratios of wall-clock tokens/s and of
tokens per CPU-second (the latter is what a fair share of the machine would give each). Ours:
the model as the server loads it with --dtype int8, one unpadded forward per workload;
onnxruntime: the transformers optimizer's fused graph + ``quantize_dynamic`` (benchmarks.peers),
one pair at a time, in this process.

    python -m benchmarks.int8_head_to_head [--size small] [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import torch

from benchmarks.checkpoints import ensure_checkpoint
from benchmarks.measure import REPO, MachineLoad, cpu_facts, device_description, git_commit, slug
from benchmarks.onnx_baseline import OnnxPerPair
from benchmarks.peers import ensure_onnx_int8
from benchmarks.workloads import make_workloads
from rerank_kernels.cpu_memory import keep_freed_memory
from rerank_server.engine import model_shapes
from rerank_server.models.encoder import EncoderConfig, load_cross_encoder

TARGET = 1.2


def timed(fn) -> dict:
    """One call: wall seconds and this process's CPU seconds (user + system)."""
    t0 = os.times()
    with MachineLoad() as load:
        fn()
    t1 = os.times()
    return {"wall_s": load.wall, "cpu_s": t1.user + t1.system - t0.user - t0.system,
            "foreign_cpus": load.foreign_cpus}


def main(argv: list[str] | None = None) -> None:
    import rerank_kernels

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="threads of each (default 1: on a shared machine each then gets a core's fair share)")
    p.add_argument("--out", default=None, help="results file name under benchmarks/results/")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    checkpoint = ensure_checkpoint(a.size)
    config = EncoderConfig.from_hf(json.loads((checkpoint / "config.json").read_text()))
    # the quantized ONNX model first: the optimizer and the quantizer hold copies of the full model,
    # too much memory beside ours
    peer_model = ensure_onnx_int8(checkpoint)
    ops = rerank_kernels.select_ops("cpu", dtype=torch.int8, shapes=model_shapes(config))
    ours = load_cross_encoder(checkpoint, ops, torch.device("cpu"), torch.int8)
    keep_freed_memory()  # as Engine.load does on the CPU
    peer = OnnxPerPair(peer_model, a.threads)
    workloads = make_workloads(a.docs, config.vocab_size, 256, 0)
    results = {}
    for w in workloads:
        w.pack(16384, 16, torch.device("cpu"))

        def run_ours(w=w):
            return torch.cat([ours(ids, cu, n) for ids, cu, n in w.ours_batches])

        def run_peer(w=w):
            return peer(w.docs)
        logit_diff = float((run_ours() - run_peer()).abs().max())  # also the warm-up
        rounds = []
        for i in range(a.rounds):
            first, second = (("ours", run_ours), ("onnxruntime", run_peer))[::1 if i % 2 == 0 else -1]
            r = {first[0]: timed(first[1]), second[0]: timed(second[1])}
            r["ratio_wall"] = r["onnxruntime"]["wall_s"] / r["ours"]["wall_s"]
            r["ratio_per_cpu_s"] = r["onnxruntime"]["cpu_s"] / r["ours"]["cpu_s"]
            rounds.append(r)
            print(f"{w.name} round {i}: ours {w.tokens / r['ours']['wall_s']:,.0f} tokens/s "
                  f"({w.tokens / r['ours']['cpu_s']:,.0f} per CPU-s), onnxruntime int8 "
                  f"{w.tokens / r['onnxruntime']['wall_s']:,.0f} ({w.tokens / r['onnxruntime']['cpu_s']:,.0f} "
                  f"per CPU-s); others used {r['ours']['foreign_cpus'] or 0:.2f} / "
                  f"{r['onnxruntime']['foreign_cpus'] or 0:.2f} CPUs", flush=True)
        wall = statistics.median(r["ratio_wall"] for r in rounds)
        per_cpu = statistics.median(r["ratio_per_cpu_s"] for r in rounds)
        results[w.name] = {
            "tokens": w.tokens, "docs": len(w.docs), "rounds": rounds, "max_abs_logit_diff": logit_diff,
            "ours_tokens_per_cpu_s": statistics.median(w.tokens / r["ours"]["cpu_s"] for r in rounds),
            "onnxruntime_int8_tokens_per_cpu_s": statistics.median(w.tokens / r["onnxruntime"]["cpu_s"]
                                                                   for r in rounds),
            "ratio_wall_median": wall, "ratio_per_cpu_s_median": per_cpu,
            "target": f"ours int8 >= {TARGET}x onnxruntime int8", "pass_wall": wall >= TARGET,
            "pass_per_cpu_s": per_cpu >= TARGET}
        print(f"  {'PASS' if per_cpu >= TARGET else 'FAIL'}  {w.name}: ours int8 / onnxruntime int8 = {per_cpu:.2f} "
              f"per CPU-second, {wall:.2f} wall-clock (medians of {a.rounds} alternating rounds; target {TARGET})",
              flush=True)
    loads = [r[k]["foreign_cpus"] for w in results.values() for r in w["rounds"] for k in ("ours", "onnxruntime")
             if r[k]["foreign_cpus"] is not None]
    record = {"benchmark": "int8_head_to_head", "device": device_description(torch.device("cpu")),
              "cpu": cpu_facts(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              **git_commit(), "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
              "threads": a.threads, "checkpoint": checkpoint.name,
              "gemm_choices": {k: v["chosen"] for k, v in ops.choices["cpu_gemm"]["by_kind"].items()},
              "attention": ops.attention_backend,
              "machine_load": {"median_foreign_cpus": statistics.median(loads) if loads else None,
                               "note": "measured while other processes shared the 2 CPUs: the per-CPU-second "
                                       "ratio is the comparable figure; wall-clock rates are lower bounds"},
              "workloads": results}
    out = REPO / "benchmarks" / "results" / (a.out or f"int8-head-to-head-{slug(checkpoint.name)}-"
                                             f"{slug(record['device'])}-{record['date'][:10]}.json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
