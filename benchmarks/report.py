"""Renders the results files under benchmarks/results/: the tables of benchmarks/README.md
and the short summary in the top-level README.md.

    python -m benchmarks.report            # print the tables
    python -m benchmarks.report --readme   # rewrite both READMEs between their markers

Every figure comes from a file a benchmark wrote; each table names its file, device, date and
commit.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start (python -m benchmarks.report --readme) -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start (python -m benchmarks.report --readme) -->", "<!-- summary:end -->"


def provenance(path: Path, d: dict) -> str:
    device = d["device"]
    name = device.get("description") or device.get("name", "?")
    extra = f", {device['logical_cpus']} cores" if "logical_cpus" in device else ""
    dirty = " (+ uncommitted changes)" if d["git"].get("tree_differs_from_commit") else ""
    return (f"`{path.relative_to(ROOT)}`: {name}{extra}, {d['date']}, commit "
            f"`{(d['git'].get('commit') or 'unknown')[:10]}`{dirty}"
            + (f", torch {d['torch']}" if 'torch' in d else ""))


def forward_section(path: Path, d: dict) -> str:
    """One row per workload and backend: tokens/s, ratios to HF and onnxruntime (where they ran),
    share of the GEMM rate of the backend's dtype, largest logit difference from HF."""
    dtypes = ", ".join(d.get("dtypes", [d["dtype"]]))
    peers = "HF padded" + (" and onnxruntime one pair at a time" if d.get("onnxruntime") else "")
    lines = [f"**Forward, ours vs {peers}** — {provenance(path, d)}, ours in {dtypes}, "
             f"random full-size weights; HF: `{d['settings']['hf_attn_implementation']}` attention, fp32, padded "
             f"micro-batches of {d['settings']['hf_batch_size']} in arrival order"
             + (f"; onnxruntime {d['onnxruntime']['version']}, fp32" if d.get("onnxruntime") else "") + ".", "",
             "| workload | tokens | padding (HF) | backend | tokens/s | / HF | / onnxruntime | share of GEMM rate "
             "| max abs Δlogit vs HF |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, w in d["workloads"].items():
        first = True
        for backend, b in w.items():
            if not (isinstance(b, dict) and b.get("tokens_per_s")):
                continue
            share = b.get("useful_fraction_of_gemm_rate") or b.get("mfu_vs_800_tflops")
            # files written before per-backend ratios name ours' on the workload
            ratio = b.get("ratio_over_hf", w.get("ratio_ours_over_hf") if backend == "ours" else None)
            diff = b.get("max_abs_logit_diff_vs_hf",
                         w.get("max_abs_logit_diff_ours_vs_hf") if backend == "ours" else None)
            head = (f"{name} ({w['description']}) | {w['tokens']} | {w.get('padding_fraction', 0):.0%}" if first
                    else "| |")
            first = False
            lines.append(
                f"| {head} | {backend} | {b['tokens_per_s']:,.0f} | {fmt_ratio(ratio)} "
                f"| {fmt_ratio(b.get('ratio_over_onnxruntime'))} | {'' if share is None else f'{share:.1%}'} "
                f"| {'' if diff is None else f'{diff:.1e}'} |")
    gemm = d.get("gemm", {})
    per_dtype = gemm.get("per_dtype")
    if per_dtype:
        rates = "; ".join(
            f"{dtype}: " + ", ".join(f"{n} {r / 1e9:.0f}" for n, r in g.get("layer_mix_best_of_both", {}).items())
            + f" (best: {g.get('best')})" for dtype, g in per_dtype.items())
        lines += ["", f"GEMM rates measured in the same run at the model's shapes (GFLOP/s, one layer's mix): {rates}; "
                      "each backend's share is of the best rate of its dtype, counting the full model's useful "
                      "FLOPs on real tokens."]
    elif gemm.get("reference_flops_per_s"):
        lines += ["", f"GEMM rate measured in the same run (`F.linear` at the model's shapes): "
                      f"{gemm['reference_flops_per_s'] / 1e9:.0f} GFLOP/s; shares count the full model's useful "
                      "FLOPs on real tokens."]
    rss = d.get("rss")
    if rss and rss.get("peak_rss_bytes"):
        lines.append(f"Peak resident memory of our model alone (load + forward, {rss['workload']}): "
                     f"{rss['peak_rss_bytes'] / 2**30:.2f} GiB = "
                     f"{rss['peak_rss_bytes'] / d['model']['weight_bytes']:.2f}x "
                     f"the weight bytes.")
    targets = d.get("targets")
    if targets and per_dtype:
        lines += ["", "Targets: " + "; ".join(f"{name}: {t['value']:.2f} ({'pass' if t['pass'] else 'FAIL'}"
                                             f"{', contended' if t.get('contended') else ''})"
                                             for name, t in targets.items())]
    return "\n".join(lines)


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def neighbours_note(d: dict) -> str:
    """The top-concurrency runs' share is against the raw forward right before and after them."""
    notes = [r["transport"] + " " + " and ".join(f"{n['tokens_per_s']:,.0f}" for n in r["raw_forward_neighbours"])
             for r in d["runs"] if r.get("raw_forward_neighbours")]
    return (" The share of the highest-concurrency rows is against the raw forward measured right before "
            f"and after each ({'; '.join(notes)} tokens/s)." if notes else "")


def load_section(path: Path, d: dict) -> str:
    raw = d["raw_forward"]
    lines = [f"**Serving under load** — {provenance(path, d)}; model `{d['model']['checkpoint']}` "
             f"({d['model']['layers']} layers, hidden {d['model']['hidden']}); requests of "
             f"{d['workload']['documents_min']}-{d['workload']['documents_max']} documents, "
             f"{d['workload']['tokens_per_request_mean']:.0f} tokens on average. Raw forward in the same run: "
             f"{raw['tokens_per_s']:,.0f} tokens/s (best pass at its start or end; median "
             f"{raw['median_tokens_per_s']:,.0f}).{neighbours_note(d)}", "",
             "| transport | batching | clients | requests/s | tokens/s | p50 ms | p95 ms | p99 ms "
             "| share of raw forward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        lat = r["latency_s"]
        lines.append(f"| {r['transport']} | {'on' if r['batching'] else 'off'} | {r['mode']} "
                     f"| {r['requests_per_s']:.1f} "
                     f"| {r['tokens_per_s']:,.0f} | {lat['p50'] * 1e3:.0f} | {lat['p95'] * 1e3:.0f} "
                     f"| {lat['p99'] * 1e3:.0f} | {r.get('fraction_of_raw_forward', float('nan')):.0%} |")
    for r in d["runs"]:
        ideal = r.get("ideal_fifo")
        if ideal:
            lines += ["", f"{r['transport']} at half load ({r['offered_rate']:.1f} requests/s, "
                          f"{r.get('arrivals', 'Poisson')} arrivals): p99/p50 = "
                          f"{r['p99_over_p50']:.2f}; an ideal FIFO server (no overhead, the raw forward's rate) on the "
                          f"same arrivals: p50 {ideal['p50'] * 1e3:.0f} ms, p99 {ideal['p99'] * 1e3:.0f} ms, p99/p50 = "
                          f"{ideal['p99_over_p50']:.2f}."]
    lines += ["", "Targets: " + "; ".join(f"{name}: {t['value']:.2f} ({'pass' if t['pass'] else 'FAIL'})"
                                         for name, t in d["targets"].items())]
    return "\n".join(lines)


def rest_e2e_line(path: Path, d: dict) -> str:
    """One request over REST against onnxruntime one pair at a time (benchmarks.rest_e2e)."""
    ours, ort, req = d["ours_rest"], d.get("onnxruntime"), d["request"]
    flags = f" `{d['server_args']}`" if d.get("server_args") else ""
    text = (f"End to end over REST, `{d['model']['checkpoint']}`{flags}, one query and {req['docs']} documents "
            f"({req['tokens']} tokens): ours {ours['tokens_per_s']:,.0f} tokens/s")
    if ort:
        text += (f", onnxruntime fp32 one pair at a time {ort['tokens_per_s']:,.0f} tokens/s = "
                 f"{ours['tokens_per_s'] / ort['tokens_per_s']:.2f}x")
    by_dtype = d.get("ours_rest_by_dtype") or {}
    if len(by_dtype) > 1:
        text += "; ours by --dtype: " + ", ".join(f"{k} {v['tokens_per_s']:,.0f}" for k, v in by_dtype.items())
    peers = {k: v for k, v in (d.get("peers") or {}).items() if "tokens_per_s" in v}
    if peers:
        text += "; peers (own processes): " + ", ".join(f"{k} {v['tokens_per_s']:,.0f}" for k, v in peers.items())
    if ours.get("contended") or any(v.get("contended") for v in (*by_dtype.values(), *peers.values())):
        text += " (CONTENDED: other processes used the CPUs during some runs; lower bounds, ratios inconclusive)"
    return f"{text} ({provenance(path, d)})"


def results_files() -> list[tuple[Path, dict]]:
    """(path, contents), the forward benchmark first, then the runs in the order they were made."""
    files = [(path, json.loads(path.read_text())) for path in RESULTS.glob("*.json")]
    return sorted(files, key=lambda f: (f[1].get("benchmark") != "forward", f[1].get("timestamp", ""), f[0].name))


def summary() -> str:
    """One line per results file: its headline figures, with device, date and commit."""
    lines = []
    for path, d in results_files():
        if d.get("quick"):
            continue
        if d.get("benchmark") == "forward":
            figures = [f"{name} {w['ours']['tokens_per_s']:,.0f} tokens/s = {w['ratio_ours_over_hf']:.2f}x Hugging Face"
                       + (f", {w['ours']['ratio_over_onnxruntime']:.2f}x onnxruntime per pair"
                          if "ratio_over_onnxruntime" in w["ours"] else "")
                       + (f" (bf16: {w['ours-bf16']['tokens_per_s']:,.0f} tokens/s)" if "ours-bf16" in w else "")
                       for name, w in d["workloads"].items() if w.get("hf") and w["ours"].get("tokens_per_s")]
            lines.append(f"- Forward, {d['dtype']}, full-size random weights: {'; '.join(figures)} "
                         f"({provenance(path, d)})")
        elif d.get("benchmark") == "rest_e2e":
            lines.append("- " + rest_e2e_line(path, d))
        elif d.get("benchmark") == "load":
            closed = [r for r in d["runs"] if r.get("fraction_of_raw_forward") and r["batching"]
                      and r["mode"].split()[0].isdigit()]
            clients = max((int(r["mode"].split()[0]) for r in closed), default=0)
            figures = [f"{r['transport']} {r['fraction_of_raw_forward']:.0%}" for r in closed
                       if int(r["mode"].split()[0]) == clients]
            tails = [f"{r['transport']} {r.get('arrivals', 'Poisson')} {r['p99_over_p50']:.2f} "
                     f"(ideal FIFO {r['ideal_fifo']['p99_over_p50']:.2f})" for r in d["runs"] if r.get("ideal_fifo")]
            lines.append(f"- Serving `{d['model']['checkpoint']}` at {clients} clients, share of the raw forward: "
                         f"{', '.join(figures)}; half-load p99/p50: {', '.join(tails)} ({provenance(path, d)})")
    return "\n".join(lines) or "No results yet."


def render() -> str:
    sections = []
    files = results_files()
    for path, d in files:
        if d.get("quick"):
            continue
        if d.get("benchmark") == "forward":
            sections.append(forward_section(path, d))
        elif d.get("benchmark") == "load":
            sections.append(load_section(path, d))
        elif d.get("benchmark") == "rest_e2e":
            sections.append(rest_e2e_line(path, d))
    return "\n\n".join(sections) or "No results yet."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="rewrite README.md between the results markers")
    args = parser.parse_args()
    text = render()
    if not args.readme:
        print(text)
        return
    replace_between(ROOT / "benchmarks" / "README.md", START, END, text)
    replace_between(ROOT / "README.md", SUMMARY_START, SUMMARY_END, summary())
    print("benchmarks/README.md tables and README.md summary rewritten")


def replace_between(readme: Path, start: str, end: str, text: str) -> None:
    body = readme.read_text()
    if start not in body:
        raise SystemExit(f"{readme.relative_to(ROOT)} has no '{start}' marker")
    head, rest = body.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
