"""Renders the results files under benchmarks/results/: the tables of benchmarks/README.md
and the short summary in the top-level README.md.

    python -m benchmarks.report            # print the tables
    python -m benchmarks.report --plots    # (re)draw the PNG plots under benchmarks/results/plots/
    python -m benchmarks.report --readme   # both, and rewrite both READMEs between their markers

Every figure comes from a file a benchmark wrote; each table names its file, device, date and
commit, and how busy the rest of the machine was while it ran; the index in benchmarks/README.md
says what each file shows and which of its targets it met and missed. The plots (benchmarks.plots)
draw the newest file of each series.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start (python -m benchmarks.report --readme) -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start (python -m benchmarks.report --readme) -->", "<!-- summary:end -->"
INDEX_START, INDEX_END = "<!-- index:start (python -m benchmarks.report --readme) -->", "<!-- index:end -->"


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
    lines += ["", load_note(d)]
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


FOREIGN_KEYS = ("foreign_cpus", "foreign_cpus_max", "foreign_cpus_best_pass", "foreign", "foreign_cpus_unprofiled")
CONTENDED_SHARE = 0.10  # benchmarks.measure.MachineLoad's: other processes above it make a run contended


def foreign_cpus(d) -> list[float]:
    """Every record of how many CPUs other processes used during a timed part of a run."""
    if isinstance(d, dict):  # a file's machine_load summary repeats its runs' figures
        return [x for k, v in d.items() if k != "machine_load"
                for x in ([v] if k in FOREIGN_KEYS and isinstance(v, int | float) else foreign_cpus(v))]
    if isinstance(d, list):
        return [x for v in d for x in foreign_cpus(v)]
    return []


def cpus(d: dict) -> int | None:
    """The machine's logical CPUs, where the file records them."""
    for facts in (d.get("device"), d.get("cpu")):
        if isinstance(facts, dict) and facts.get("logical_cpus"):
            return facts["logical_cpus"]
    return d.get("threads")


def under_load(d: dict) -> bool:
    """Other processes used more than CONTENDED_SHARE of the machine during some timed part."""
    foreign = foreign_cpus(d)
    return bool(foreign) and max(foreign) > CONTENDED_SHARE * (cpus(d) or 1)


def under_load_clause(d: dict) -> str:
    return (f"; under load: others used up to {max(foreign_cpus(d)):.2f} of {cpus(d)} CPUs" if under_load(d)
            else "")


def load_note(d: dict) -> str:
    """How busy the rest of the machine was while the file's figures were taken."""
    foreign = foreign_cpus(d)
    if not foreign:
        return "Machine load: not recorded."
    state = (f"taken under load (others above {CONTENDED_SHARE:.0%} of the machine)" if under_load(d)
             else "uncontended")
    return (f"Machine load: other processes used at most {max(foreign):.2f} of {cpus(d)} CPUs "
            f"(mean {sum(foreign) / len(foreign):.2f} over {len(foreign)} timed parts): {state}.")


def profile_section(path: Path, d: dict) -> str:
    """Where one forward's time goes (benchmarks.profile_forward), per dtype and workload."""
    m = d["model"]
    lines = [f"**Profile of the CPU forward** — {provenance(path, d)}; {m['layers']} layers at full width "
             f"(hidden {m['hidden']}, FFN {m['intermediate']}), random weights; torch.profiler, "
             f"{next(iter(d['cases'].values()))['repeats']} forwards per case.", "",
             "| case | tokens | tokens/s (unprofiled) | GEMMs | GEMM GFLOP/s | attention | attention GFLOP/s "
             "| LayerNorms | other | others' CPUs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in d["cases"].items():
        f = c["categories_fraction"]
        norms = sum(v for k, v in f.items() if k in ("ops.add_layernorm", "ops.embed_layernorm"))
        other = sum(v for k, v in f.items() if not k.startswith("gemm.") and k not in (
            "ops.add_layernorm", "ops.embed_layernorm", "ops.varlen_attention"))
        lines.append(f"| {name} | {c['tokens']} | {c['tokens_per_s_unprofiled']:,.0f} | {c['gemm_fraction']:.0%} "
                     f"| {(c['gemm_flops_per_s'] or 0) / 1e9:.0f} | {c['attention_fraction']:.0%} "
                     f"| {(c['attention_flops_per_s'] or 0) / 1e9:.0f} | {norms:.0%} | {other:.0%} "
                     f"| {c['foreign_cpus'] or 0:.2f} |")
    lines += ["", load_note(d)]
    return "\n".join(lines)


def huge_document_section(path: Path, d: dict) -> str:
    """Server CPU of one request with a ~15 MB document (benchmarks.huge_document)."""
    repeats = len(next(iter(d["cases"].values()))["server_cpu_s"])
    lines = [f"**One huge document over REST** — {provenance_plain(path, d)}; model `{d['checkpoint']}`; server "
             f"CPU time (every thread) per request, best and mean of {repeats}; target <= {d['target_cpu_s']:g} s.", "",
             "| case | body MB | server CPU s (best) | mean | wall s (best) | target |",
             "|---|---|---|---|---|---|"]
    for name, c in d["cases"].items():
        lines.append(f"| {name} | {c['body_bytes'] / 1e6:.1f} | {c['server_cpu_s_best']:.2f} "
                     f"| {c['server_cpu_s_mean']:.2f} | {min(c['wall_s']):.2f} "
                     f"| {'met' if c['within_target'] else 'missed'} |")
    lines += ["", load_note(d)]
    return "\n".join(lines)


def provenance_plain(path: Path, d: dict) -> str:
    """For files whose device is a string and whose commit sits at the top level (older schemas)."""
    git = d.get("git") or {"commit": d.get("commit"), "tree_differs_from_commit": d.get("tree_differs_from_commit")}
    device = d["device"] if isinstance(d.get("device"), dict) else {"description": d.get("device") or d.get("cpu")}
    return provenance(path, {**d, "git": git, "device": {**device, "logical_cpus": cpus(d)},
                             "date": str(d["date"])[:10]})


def fidelity_line(path: Path, d: dict) -> str:
    e, r = d["logit_error"], d["ranking"]
    speed = d.get("speed_tokens_per_s", {})
    return (f"bfloat16 against float32 on the CPU, `{d['checkpoint']['size']}` random checkpoint, {d['queries']} "
            f"queries x {d['documents_per_query']} documents: logit error max {e['max']:.3f}, mean {e['mean']:.3f} "
            f"(transformers' own bf16: max {e['transformers_bf16_max_on_64_pairs']:.3f}); top-1 kept on "
            f"{r['top1_overlap']:.0%} of queries, Kendall tau {r['kendall_tau_mean']:.2f} "
            f"(min {r['kendall_tau_min']:.2f})"
            + (f"; speed, one run each: float32 {speed['float32']:,.0f}, bfloat16 {speed['bfloat16']:,.0f} tokens/s"
               if speed else "") + f" ({provenance_plain(path, d)})")


def kind(d: dict) -> str:
    return d.get("benchmark") or ("fidelity" if "logit_error" in d else "unknown")


def what(d: dict) -> str:
    """What one results file measured, in a phrase."""
    k = kind(d)
    if k == "forward":
        peers = "Hugging Face" + (" and onnxruntime one pair at a time" if d.get("onnxruntime") else "")
        dtypes = ", ".join(d.get("dtypes", [d["dtype"]]))
        return f"the forward alone in {dtypes}, `{d['model']['checkpoint']}` (random weights), against {peers}"
    if k == "load":
        runs, st = d["runs"], d["settings"]
        extra = (", half load (paced and Poisson arrivals) against an ideal FIFO server"
                 if any(r.get("arrivals") for r in runs) else ", no half-load runs")
        extra += ", `--no-batching`" if any(not r["batching"] for r in runs) else ""
        return (f"`{d['model']['checkpoint']}` served over {' and '.join(st['transports'])} at "
                f"{', '.join(map(str, st['concurrency']))} clients against the raw forward{extra}")
    if k == "rest_e2e":
        flags = f" `{d['server_args']}`" if d.get("server_args") else ""
        return (f"one request of {d['request']['docs']} documents over REST, `{d['model']['checkpoint']}`{flags}"
                + (", against onnxruntime one pair at a time" if d.get("onnxruntime") else ""))
    if k == "huge_document":
        return f"server CPU of one request with a ~15 MB document, `{d['checkpoint']}`"
    if k == "fidelity":
        return (f"bfloat16's logit error and ranking changes against float32, `{d['checkpoint']['size']}` random "
                "checkpoint")
    if k == "profile":
        return (f"where the CPU forward's time goes ({d['model']['layers']} layers at full width; "
                f"{', '.join(sorted({c.split()[0] for c in d['cases']}))})")
    if k == "qwen3_forward":
        return (f"{d['model']}, in {d['dtype']}: ours with and without the shared prefix against transformers' "
                "causal LM (left-padded)")
    if k == "encoders_forward":
        return ("ModernBERT and DeBERTa-v2 (xsmall, base shapes) forwards in float32 against transformers; "
                "ModernBERT at one 8,192-token pair, local windows against every layer global")
    return k


def targets_of(d: dict) -> tuple[list[str], list[str]]:
    """(met, missed): the file's targets by name."""
    if kind(d) == "huge_document":
        met = [f"{n} <= {d['target_cpu_s']:g} s CPU" for n, c in d["cases"].items() if c["within_target"]]
        missed = [f"{n} <= {d['target_cpu_s']:g} s CPU" for n, c in d["cases"].items() if not c["within_target"]]
        return met, missed
    targets = d.get("targets") or {}
    met = [f"{n} ({t['value']:.2f})" for n, t in targets.items() if t["pass"]]
    missed = [f"{n} ({t['value']:.2f})" for n, t in targets.items() if not t["pass"]]
    return met, missed


def index_table() -> str:
    """One row per results file: what it shows, which of its targets it met and missed, how busy
    the machine was."""
    lines = ["| file | commit | what it shows | targets met | targets missed | other processes' CPUs (max) |",
             "|---|---|---|---|---|---|"]
    for path, d in results_files():
        met, missed = targets_of(d)
        foreign = foreign_cpus(d)
        load = (f"{max(foreign):.2f} of {cpus(d)}" + (" (under load)" if under_load(d) else "") if foreign
                else "not recorded")
        commit = ((d.get("git") or {}).get("commit") or d.get("commit") or "unknown")[:10]
        lines.append(f"| `{path.name}` | `{commit}` | {what(d)} | {'; '.join(met) or 'none'} "
                     f"| {'; '.join(missed) or 'none'} | {load} |")
    return "\n".join(lines)


def results_files() -> list[tuple[Path, dict]]:
    """(path, contents), the forward benchmark first, then the runs in the order they were made."""
    files = [(path, json.loads(path.read_text())) for path in RESULTS.glob("*.json")]
    return sorted(files, key=lambda f: (f[1].get("benchmark") != "forward",
                                        str(f[1].get("timestamp") or f[1].get("date", "")), f[0].name))


def series(d: dict) -> tuple:
    """What a file measures: a later file of the same series supersedes it in the summary."""
    k = kind(d)
    if k == "forward":
        return k, d.get("dtype"), d.get("device", {}).get("type"), d["model"]["checkpoint"], under_load(d)
    if k == "load":  # the same model at the same highest concurrency
        return k, d["model"]["checkpoint"], max(d["settings"]["concurrency"])
    if k == "rest_e2e":  # a run under load does not supersede one on a quiet machine
        return k, d["model"]["checkpoint"], d.get("server_args", ""), under_load(d)
    return (k,)


def latest_files() -> list[tuple[Path, dict]]:
    """The newest file of each series (results_files' order), in that order."""
    latest: dict[tuple, tuple[Path, dict]] = {}
    for path, d in results_files():
        if not d.get("quick"):
            latest[series(d)] = (path, d)
    return [f for f in results_files() if f in latest.values()]


def summary() -> str:
    """One line per series of results files, from its newest file: its headline figures, with
    device, date, commit and the machine's load."""
    lines = []
    for path, d in latest_files():
        if d.get("benchmark") == "forward" and not any(w.get("hf") for w in d["workloads"].values()):
            # a run without Hugging Face (the int8 runs): tokens/s of each of ours and of onnxruntime
            figures = [f"{name}: " + ", ".join(f"{system} {w[system]['tokens_per_s']:,.0f}" for system in
                                                ("ours", "ours-bf16", "ours-int8", "onnxruntime") if w.get(system))
                       + " tokens/s" for name, w in d["workloads"].items()]
            contended = any(t.get("contended") for t in (d.get("targets") or {}).values())
            lines.append(f"- Forward, `{d['model']['checkpoint']}` (ours = float32): {'; '.join(figures)}"
                         + (" (CONTENDED: lower bounds, ratios inconclusive)" if contended else "")
                         + f" ({provenance(path, d)})")
        elif d.get("benchmark") == "forward":
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
            under = under_load_clause(d)
            tails = f"; half-load p99/p50: {', '.join(tails)}" if tails else "; no half-load runs"
            lines.append(f"- Serving `{d['model']['checkpoint']}` at {clients} clients, share of the raw forward: "
                         f"{', '.join(figures)}{tails}{under} ({provenance(path, d)})")
        elif kind(d) == "huge_document":
            worst = max(d["cases"].items(), key=lambda kv: kv[1]["server_cpu_s_best"])
            under = under_load_clause(d)
            lines.append("- One ~15 MB document over REST: server CPU (best of the repeats) "
                         + ", ".join(f"{n} {c['server_cpu_s_best']:.2f} s" for n, c in d["cases"].items())
                         + f"; the most: {worst[0]} ({worst[1]['server_cpu_s_best']:.2f} s, target <= "
                         f"{d['target_cpu_s']:g} s){under} ({provenance_plain(path, d)})")
        elif kind(d) == "fidelity":
            lines.append("- " + fidelity_line(path, d))
        elif kind(d) == "profile":
            parts = [f"{name}: GEMMs {c['gemm_fraction']:.0%} at {(c['gemm_flops_per_s'] or 0) / 1e9:.0f} GFLOP/s, "
                     f"attention {c['attention_fraction']:.0%} at {(c['attention_flops_per_s'] or 0) / 1e9:.0f} GFLOP/s"
                     for name, c in d["cases"].items()]
            under = under_load_clause(d)
            lines.append(f"- Profile of the CPU forward ({d['model']['layers']} layers at full width): "
                         f"{'; '.join(parts)}{under} ({provenance(path, d)})")
    return "\n".join(lines) or "No results yet."


def render() -> str:
    sections = []
    files = results_files()
    for path, d in files:
        if d.get("quick"):
            continue
        if d.get("benchmark") == "forward":
            sections.append(forward_section(path, d) + "\n\n" + load_note(d))
        elif d.get("benchmark") == "load":
            sections.append(load_section(path, d))
        elif d.get("benchmark") == "rest_e2e":
            sections.append(rest_e2e_line(path, d) + "\n\n" + load_note(d))
        elif kind(d) == "huge_document":
            sections.append(huge_document_section(path, d))
        elif kind(d) == "fidelity":
            sections.append(fidelity_line(path, d) + "\n\n" + load_note(d))
        elif kind(d) == "profile":
            sections.append(profile_section(path, d))
    return "\n\n".join(sections) or "No results yet."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true",
                        help="draw the plots and rewrite both READMEs between their markers")
    parser.add_argument("--plots", action="store_true", help="draw the plots (needs matplotlib: the bench extra)")
    args = parser.parse_args()
    from benchmarks import plots  # it imports this module

    if args.plots or args.readme:
        written = plots.write()
        print(f"{len(written)} plots in {plots.PLOTS.relative_to(ROOT)}")
    if not args.readme:
        if not args.plots:
            print(render())
        return
    replace_between(ROOT / "benchmarks" / "README.md", START, END, render())
    replace_between(ROOT / "benchmarks" / "README.md", INDEX_START, INDEX_END, index_table())
    replace_between(ROOT / "benchmarks" / "README.md", plots.PLOTS_START, plots.PLOTS_END, plots.markdown())
    replace_between(ROOT / "README.md", SUMMARY_START, SUMMARY_END, summary())
    replace_between(ROOT / "README.md", plots.HEADLINE_START, plots.HEADLINE_END, plots.headline_markdown())
    print("benchmarks/README.md tables and plots, README.md summary and headline plot rewritten")


def replace_between(readme: Path, start: str, end: str, text: str) -> None:
    body = readme.read_text()
    if start not in body:
        raise SystemExit(f"{readme.relative_to(ROOT)} has no '{start}' marker")
    head, rest = body.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
