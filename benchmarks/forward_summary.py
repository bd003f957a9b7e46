"""The forward benchmark's summary: FLOP rates against the GEMM rate of each backend's dtype,
the targets (printed as PASS/FAIL, never adjusted to the result) and the printed report."""
from __future__ import annotations

import argparse

import torch

from benchmarks.measure import GiB, MachineLoad, fmt_rate, fmt_s
from benchmarks.probes import TARGET_MEMORY_HEADROOM

H100_PEAK_FLOPS = 800e12  # dense fp16/bf16, GUIDE section 5
TARGET_MIXED_RATIO = 2.0  # ours / HF tokens/s on the mixed workload
TARGET_GEMM_FRACTION = 0.85  # CPU: ours fp32 useful FLOP/s / the best fp32 GEMM candidate's rate
TARGET_OVER_ONNX_FP32 = 1.2  # CPU: ours fp32 / onnxruntime fp32 one pair at a time
TARGET_BF16_OVER_ONNX_FP32 = 2.0  # CPU: ours bf16 / onnxruntime fp32 one pair at a time
TARGET_RSS_RATIO = 1.3  # CPU: peak RSS of ours / weight bytes
TARGET_UNIFORM_RATIO = 1.3  # CUDA: ours / the fastest HF, uniform workload
TARGET_MFU = 0.60  # CUDA: ours useful FLOP/s / 800 TFLOP/s, uniform (256-token) workload


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def add_rates(results: dict, gemm_refs: dict[str, float], backend_dtypes: dict[str, str],
              device: torch.device) -> None:
    """Each backend's useful and executed FLOP rate as a share of the GEMM rate of its dtype
    (``gemm_refs``: dtype name -> the best candidate's FLOP/s)."""
    for entry in results.values():
        for name, b in backend_entries(entry).items():
            ref = gemm_refs.get(backend_dtypes[name])
            b["gemm_reference_dtype"] = backend_dtypes[name]
            if ref:
                b["useful_fraction_of_gemm_rate"] = b["useful_flops_per_s"] / ref
                b["executed_fraction_of_gemm_rate"] = b["executed_flops_per_s"] / ref
            if device.type == "cuda":  # useful work (the targets) and what the backend executed
                b["mfu_vs_800_tflops"] = b["useful_flops_per_s"] / H100_PEAK_FLOPS
                b["executed_mfu_vs_800_tflops"] = b["executed_flops_per_s"] / H100_PEAK_FLOPS


def backend_entries(entry: dict) -> dict[str, dict]:
    """The per-backend results of a workload entry, in the order they ran."""
    return {k: v for k, v in entry.items() if isinstance(v, dict) and "tokens_per_s" in v}


# --------------------------------------------------------------------------- targets

def cpu_targets(results: dict, rss: dict | None) -> dict:
    """Issue 15's CPU targets: ours fp32 >= 85% of the best fp32 GEMM rate of the run and >= 1.2x
    onnxruntime fp32 one pair at a time, ours bf16 >= 2x onnxruntime fp32; and the older ones
    (ours >= 2x HF on mixed, peak RSS <= 1.3x the weights)."""
    targets = {}
    if "mixed" in results and "ratio_ours_over_hf" in results["mixed"]:
        m = results["mixed"]
        r = m["ratio_ours_over_hf"]
        targets["mixed_ours_over_hf>=2"] = {"value": r, "pass": r >= TARGET_MIXED_RATIO,
                                            "contended": m["ours"]["contended"] or m["hf"]["contended"]}
    for wname, entry in results.items():
        ours = entry["ours"]
        if "useful_fraction_of_gemm_rate" in ours:
            f = ours["useful_fraction_of_gemm_rate"]
            # named by the dtype of ours (the run's first --dtype) and of the GEMM rate it is compared with
            label = {"float32": "fp32", "bfloat16": "bf16"}.get(ours.get("gemm_reference_dtype", "float32"),
                                                               ours.get("gemm_reference_dtype"))
            targets[f"{wname}_ours_{label}_useful_fraction_of_best_{label}_gemm>={TARGET_GEMM_FRACTION}"] = {
                "value": f, "pass": f >= TARGET_GEMM_FRACTION, "contended": ours["contended"]}
        ort = entry.get("onnxruntime")
        if ort is None:
            continue
        for name, goal in (("ours", TARGET_OVER_ONNX_FP32), ("ours-bf16", TARGET_BF16_OVER_ONNX_FP32)):
            if name in entry:
                r = entry[name]["tokens_per_s"] / ort["tokens_per_s"]
                label = "fp32" if name == "ours" else "bf16"
                targets[f"{wname}_ours_{label}_over_onnxruntime_fp32_per_pair>={goal:g}"] = {
                    "value": r, "pass": r >= goal, "contended": entry[name]["contended"] or ort["contended"],
                    "detail": f"onnxruntime {ort['tokens_per_s']:,.0f} tokens/s"}
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
    nan = float("nan")  # a share without a GEMM rate of that dtype
    header = (f"{'workload':9} {'backend':{width}} {'tokens/s':>10} {'median ' + unit:>9} {'useful':>16} "
              f"{'of GEMM':>8} {'executed':>16} {'of GEMM':>8}")
    if cuda:
        header += f" {'MFU useful':>10} {'MFU exec':>9} {'peak GiB':>9}"
    print(header)
    for wname, entry in results.items():
        for name, b in backend_entries(entry).items():
            line = (f"{wname:9} {name:{width}} {b['tokens_per_s']:10,.1f} {b['median_s'] * scale:8.2f}"
                    f"{'*' if b['contended'] else ' '} "
                    f"{fmt_rate(b['useful_flops_per_s']):>16} {b.get('useful_fraction_of_gemm_rate', nan):8.1%} "
                    f"{fmt_rate(b['executed_flops_per_s']):>16} {b.get('executed_fraction_of_gemm_rate', nan):8.1%}")
            if cuda:
                line += (f" {b['mfu_vs_800_tflops']:10.2%} {b['executed_mfu_vs_800_tflops']:9.2%}"
                         f" {b['memory']['own_peak_bytes'] / GiB:9.2f}")
            print(line)
        print_comparisons(wname, entry)


def print_comparisons(wname: str, entry: dict) -> None:
    for name, b in backend_entries(entry).items():
        if "p90_s" in b:
            forwards = (entry["ours_batches"] if name.startswith("ours") else entry["docs"] if name == "onnxruntime"
                        else -(-entry["docs"] // entry["hf_batch_size"]))
            print(f"{wname:9} {name} latency: median {fmt_s(b['median_s'])}, p90 {fmt_s(b['p90_s'])} over "
                  f"{len(b['runs'])} runs ({entry['docs']} docs, {entry['tokens']} tokens, {forwards} forward(s))")
    for name, b in backend_entries(entry).items():
        if "ratio_over_hf" in b:
            print(f"{wname:9} {name}/HF = {b['ratio_over_hf']:.2f}x (padding {entry['padding_fraction']:.1%}); "
                  f"max |logit {name} - HF| = {b['max_abs_logit_diff_vs_hf']:.2e}")
    for name, b in backend_entries(entry).items():
        if "ratio_over_onnxruntime" in b:
            print(f"{wname:9} {name}/onnxruntime = {b['ratio_over_onnxruntime']:.2f}x; "
                  f"max |logit {name} - onnxruntime| = {b['max_abs_logit_diff_vs_onnxruntime']:.2e}")
    if entry.get("best_hf", "hf") != "hf":
        print(f"{wname:9} ours/{entry['best_hf']} (fastest HF) = {entry['ratio_ours_over_best_hf']:.2f}x")


def print_gemm(gemm: dict) -> None:
    """Each dtype's GEMM candidates (layer mix, each shape at its better measurement before and
    after the forwards) and the best one: the reference of that dtype's shares."""
    for dtype, g in gemm["per_dtype"].items():
        rates = ", ".join(f"{name} {fmt_rate(rate)}" for name, rate in g["layer_mix_best_of_both"].items())
        print(f"GEMM rate {dtype} (layer mix at M={g['m']}): {rates or 'none measured'}"
              + (f"; best: {g['best']}" if g.get("best") else ""))


def print_report(results: dict, gemm: dict, device: torch.device, describe: str, args: argparse.Namespace) -> None:
    print()
    print(f"=== {describe}, torch {torch.__version__}, {torch.get_num_threads()} threads, {', '.join(args.dtypes)}")
    print_gemm(gemm)
    print("times: median of the uncontended runs (the rest of the machine under "
          f"{MachineLoad.CONTENDED_SHARE:.0%} of it), or of all runs, marked *, where every run was contended")
    print("FLOPs: 'useful' = 2 x matmul params x real tokens + 4 x layers x hidden x sum(len^2) (full model, "
          "no padding); ours executes slightly less (last layer: first tokens only), HF more (padding). "
          "'of GEMM': share of the best GEMM rate of the backend's dtype.")
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
