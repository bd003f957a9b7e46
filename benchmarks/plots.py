"""PNG plots of the results files under benchmarks/results/, beside them in results/plots/:
tokens/s per system and precision (forward benchmark, REST end to end, int8 head to head) and load
curves (latency against clients). ``python -m benchmarks.report --plots`` (or ``--readme``) writes
them; the READMEs link them between their markers.

Each plot is named after the results file it draws (``<file stem>.png``), and its caption names that
file, the device, date and commit, as the report's tables do; a file taken under load says so in its
title, and bars of runs that were contended are hatched. Rendering is deterministic (no timestamps or
version in the PNG), and a file whose bytes would not change is not rewritten.
"""
from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import report

BENCHMARKS = report.ROOT / "benchmarks"
PLOTS = report.RESULTS / "plots"
PLOTS_START, PLOTS_END = "<!-- plots:start (python -m benchmarks.report --readme) -->", "<!-- plots:end -->"
HEADLINE_START = "<!-- headline-plot:start (python -m benchmarks.report --readme) -->"
HEADLINE_END = "<!-- headline-plot:end -->"
DPI = 100
WIDTH, HEIGHT, PANELS_PER_ROW = 9, 4, 3  # inches: a row of panels
PRECISIONS = {"float32": "fp32", "f32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "int8": "int8"}
# one hue per family of system, one shade per precision (fp32, bf16, int8): alike across plots
PALETTE = {"ours": ("#08519c", "#3182bd", "#6baed6"), "onnxruntime": ("#a63603", "#e6550d", "#fd8d3c"),
           "openvino": ("#006d2c", "#31a354", "#74c476")}
FAMILIES = ("ours", "onnxruntime", "openvino")
SHADES = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    contended: bool = False


@dataclass(frozen=True)
class Plot:
    source: Path  # the results file it draws
    data: dict
    title: str
    draw: Callable  # (figure, plot) -> a note for the caption, or ""

    @property
    def name(self) -> str:
        return f"{self.source.stem}.png"

    def caption(self) -> str:
        return report.provenance_plain(self.source, self.data).replace("`", "") + report.under_load_clause(
            self.data).replace("; under load", "; UNDER LOAD")

    def heading(self) -> str:
        return self.title + (" (under load)" if report.under_load(self.data) else "")


# --------------------------------------------------------------------------- which plots

def planned() -> list[Plot]:
    """The plots the newest file of each series warrants (report.latest_files), in its order."""
    out = []
    for path, d in report.latest_files():
        k = report.kind(d)
        if k == "forward":
            out.append(Plot(path, d, f"Forward tokens/s per system and precision, `{d['model']['checkpoint']}`",
                            draw_forward))
        elif k == "int8_head_to_head":
            out.append(Plot(path, d, f"int8 head to head, `{d['checkpoint']}`: tokens per CPU-second",
                            draw_int8_head_to_head))
        elif k == "load" and len(clients(d)) >= 2:  # a curve needs two client counts
            out.append(Plot(path, d, f"Serving `{d['model']['checkpoint']}`: latency and throughput against clients",
                            draw_load))
        elif k == "rest_e2e" and len(rest_e2e_bars(d)) >= 3:  # several systems, not ours alone or ours vs one
            out.append(Plot(path, d, f"End to end over REST, `{d['model']['checkpoint']}`: tokens/s per system",
                            draw_rest_e2e))
    return out


def headline(plots: list[Plot]) -> Plot | None:
    """The newest forward plot taken on a quiet machine (else the newest forward plot)."""
    forward = [p for p in plots if report.kind(p.data) == "forward"]
    quiet = [p for p in forward if not report.under_load(p.data)]
    return (quiet or forward or [None])[-1]


# --------------------------------------------------------------------------- the data of each plot

def system_label(name: str, dtype: str | None = None) -> str:
    """'ours-bf16' -> 'ours bf16', 'hf' -> 'Hugging Face fp32', 'openvino-f32' -> 'openvino fp32';
    'onnxruntime' alone is the benchmarks' own baseline, run one pair at a time."""
    family, *rest = name.split("-")
    words = ["Hugging Face" if family == "hf" else family] + [PRECISIONS.get(w, w) for w in rest]
    if dtype and not any(w in PRECISIONS.values() for w in words):
        words.append(PRECISIONS.get(dtype, dtype))
    return " ".join(words + (["per pair"] if name == "onnxruntime" else []))


def shade(label: str) -> int:
    """The index of the label's precision in SHADES (fp32 where it names none)."""
    return next((SHADES.index(w) for w in label.split(" ") if w in SHADES), 0)


def order(bar: Bar) -> tuple:
    family = bar.label.split(" ")[0]
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), shade(bar.label), bar.label


def backend_dtype(d: dict, name: str) -> str | None:
    """A forward backend's dtype: recorded per backend, else (older files) the run's for ours."""
    return ((d.get("backends") or {}).get(name) or {}).get("dtype") or (d["dtype"] if name == "ours" else None)


def forward_bars(d: dict) -> dict[str, list[Bar]]:
    """Per workload: each backend's and each peer's tokens/s."""
    panels = {}
    for workload, w in d["workloads"].items():
        bars = [Bar(system_label(name, backend_dtype(d, name)), b["tokens_per_s"], bool(b.get("contended")))
                for name, b in w.items() if name != "peers" and isinstance(b, dict) and b.get("tokens_per_s")]
        bars += [Bar(system_label(name), p["tokens_per_s"], bool(p.get("contended")))
                 for name, p in (w.get("peers") or {}).items() if p.get("tokens_per_s")]
        if bars:
            panels[f"{workload} ({w.get('tokens', 0):,} tokens)"] = sorted(bars, key=order)
    return panels


def rest_e2e_bars(d: dict) -> list[Bar]:
    """Ours per --dtype (or ours alone), onnxruntime one pair at a time, and the peers."""
    by_dtype = d.get("ours_rest_by_dtype") or {}
    bars = [Bar(system_label("ours", dtype), r["tokens_per_s"], bool(r.get("contended")))
            for dtype, r in by_dtype.items() if r.get("tokens_per_s")]
    if not bars:
        bars = [Bar(system_label("ours", dtype_flag(d.get("server_args", ""))), d["ours_rest"]["tokens_per_s"],
                    bool(d["ours_rest"].get("contended")))]
    ort = d.get("onnxruntime")
    if ort and ort.get("tokens_per_s"):
        bars.append(Bar(system_label("onnxruntime", "float32"), ort["tokens_per_s"], bool(ort.get("contended"))))
    bars += [Bar(system_label(name), p["tokens_per_s"], bool(p.get("contended")))
             for name, p in (d.get("peers") or {}).items() if p.get("tokens_per_s")]
    return sorted(bars, key=order)


def dtype_flag(server_args: str) -> str:
    """The --dtype a server ran with ('float32' where none was given)."""
    words = server_args.split()
    return words[words.index("--dtype") + 1] if "--dtype" in words[:-1] else "float32"


def int8_bars(d: dict) -> dict[str, list[Bar]]:
    contended = report.under_load(d)
    return {f"{name} ({w['tokens']:,} tokens): median ratio {w['ratio_per_cpu_s_median']:.2f}x": [
        Bar("ours int8", w["ours_tokens_per_cpu_s"], contended),
        Bar("onnxruntime int8", w["onnxruntime_int8_tokens_per_cpu_s"], contended)]
        for name, w in d["workloads"].items()}


def clients(d: dict) -> list[int]:
    return sorted({r["concurrency"] for r in d["runs"] if r.get("concurrency")})


def load_lines(d: dict) -> dict[str, list[dict]]:
    """Closed-loop runs (a fixed number of clients) per transport and batching, by clients."""
    lines: dict[str, list[dict]] = {}
    for r in d["runs"]:
        if r.get("concurrency"):
            lines.setdefault(f"{r['transport']}, batching {'on' if r['batching'] else 'off'}", []).append(r)
    return {k: sorted(v, key=lambda r: r["concurrency"]) for k, v in lines.items()}


# --------------------------------------------------------------------------- drawing

def colour(label: str) -> str:
    shades = PALETTE.get(label.split(" ")[0])
    return shades[shade(label)] if shades else "#737373"


def bar_panels(fig, panels: dict[str, list[Bar]], xlabel: str) -> str:
    """One panel of horizontal bars per entry, systems on the y axis (named once a row where every
    panel has the same systems), values at the bars' ends; a contended bar is hatched.
    -> the caption's note on hatching, if any."""
    rows = -(-len(panels) // PANELS_PER_ROW)
    fig.set_size_inches(WIDTH, HEIGHT * rows)
    same_systems = len({tuple(b.label for b in bars) for bars in panels.values()}) == 1
    axes = list(fig.subplots(rows, min(len(panels), PANELS_PER_ROW), squeeze=False, sharey=same_systems).flat)
    for spare in axes[len(panels):]:  # the last row's empty places
        spare.remove()
    top = max(b.value for bars in panels.values() for b in bars)
    for ax, (name, bars) in zip(axes[:len(panels)], panels.items(), strict=True):
        ys = [len(bars) - 1 - i for i in range(len(bars))]  # the first system on top
        ax.barh(ys, [b.value for b in bars], color=[colour(b.label) for b in bars],
                hatch=["//" if b.contended else "" for b in bars], edgecolor="white", linewidth=0.5)
        for y, b in zip(ys, bars, strict=True):
            ax.text(b.value, y, f" {b.value:,.0f}", va="center", fontsize=8)
        ax.set_yticks(ys, [b.label for b in bars], fontsize=8)
        ax.set_xlim(0, top * 1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    contended = any(b.contended for bars in panels.values() for b in bars)
    return "hatched bars: contended runs (other processes used the CPUs)" if contended else ""


def draw_forward(fig, plot: Plot) -> str:
    return bar_panels(fig, forward_bars(plot.data), "tokens/s")


def draw_rest_e2e(fig, plot: Plot) -> str:
    req = plot.data["request"]
    panel = f"one query and {req['docs']} documents ({req['tokens']:,} tokens)"
    return bar_panels(fig, {panel: rest_e2e_bars(plot.data)}, "tokens/s")


def draw_int8_head_to_head(fig, plot: Plot) -> str:
    hatching = bar_panels(fig, int8_bars(plot.data), "tokens per CPU-second")
    verdicts = {}
    for name, w in plot.data["workloads"].items():
        verdicts.setdefault((w.get("target"), w.get("pass_per_cpu_s")), []).append(name)
    targets = [f"target {target} per CPU-second {'met' if met else 'missed'} in {', '.join(names)}"
               for (target, met), names in verdicts.items() if target]
    return "; ".join(targets + ([hatching] if hatching else []))


LATENCY_STYLES = {"p50": "-", "p95": "--", "p99": ":"}


def draw_load(fig, plot: Plot) -> str:
    """Left: p50/p95/p99 latency against clients; right: tokens/s against clients beside the raw forward."""
    d = plot.data
    latency, throughput = fig.subplots(1, 2)
    for i, (name, runs) in enumerate(load_lines(d).items()):
        x = [r["concurrency"] for r in runs]
        for p, style in LATENCY_STYLES.items():
            latency.plot(x, [r["latency_s"][p] for r in runs], style, marker="o", markersize=3, color=f"C{i}",
                         label=name if p == "p50" else None)
        throughput.plot(x, [r["tokens_per_s"] for r in runs], "-", marker="o", markersize=3, color=f"C{i}",
                        label=name)
    raw = d["raw_forward"]["tokens_per_s"]
    throughput.axhline(raw, color="black", linestyle="--", linewidth=0.8, label=f"raw forward ({raw:,.0f})")
    for ax, ylabel in ((latency, "latency (s, log)"), (throughput, "tokens/s")):
        ax.set_xscale("log")
        ax.set_xticks(clients(d), [str(c) for c in clients(d)])
        ax.minorticks_off()
        ax.set_xlabel("clients", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    latency.set_yscale("log")
    throughput.set_ylim(0, max(raw, *(r["tokens_per_s"] for r in d["runs"] if r.get("concurrency"))) * 1.15)
    latency.set_title("latency: p50 solid, p95 dashed, p99 dotted", fontsize=9)
    throughput.set_title("throughput", fontsize=9)
    return ""


def render(plot: Plot) -> bytes:
    """The plot as PNG bytes: Agg, no screen, no pyplot state; no timestamp or version in the file."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    try:
        note = plot.draw(fig, plot)
    except (KeyError, TypeError, ValueError) as e:  # a results file of a schema this module does not know
        raise RuntimeError(f"cannot plot {plot.source.name}: {e!r}") from e
    fig.suptitle(plot.heading().replace("`", ""), fontsize=11, fontweight="bold")
    caption = plot.caption() + (f"; {note}" if note else "")
    fig.supxlabel("\n".join(textwrap.wrap(caption, 140)), fontsize=7.5, color="#404040")
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})
    return out.getvalue()


def write(directory: Path = PLOTS, plots: list[Plot] | None = None) -> list[Path]:
    """Renders every planned plot into directory, rewriting only files whose bytes change, and
    deletes the PNGs there that no plot names any more (superseded results)."""
    plots = planned() if plots is None else plots
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for plot in plots:
        path, png = directory / plot.name, render(plot)
        if not path.exists() or path.read_bytes() != png:
            path.write_bytes(png)
        paths.append(path)
    for stale in set(directory.glob("*.png")) - set(paths):
        stale.unlink()
    return paths


# --------------------------------------------------------------------------- markdown

def markdown() -> str:
    """benchmarks/README.md's block: each plot under its heading and source."""
    plots = planned()
    return "\n\n".join(f"**{p.heading()}** — {report.provenance_plain(p.source, p.data)}\n\n"
                       f"![{p.heading().replace('`', '')}]({PLOTS.relative_to(BENCHMARKS)}/{p.name})"
                       for p in plots) or "No plots yet."


def headline_markdown() -> str:
    """README.md's block: the headline plot, linked to benchmarks/README.md's plots."""
    plot = headline(planned())
    if plot is None:
        return "No forward results yet."
    return (f"![{plot.heading().replace('`', '')}]({PLOTS.relative_to(report.ROOT)}/{plot.name})\n\n"
            f"*{plot.heading()}* — {report.provenance_plain(plot.source, plot.data)}. Every plot: "
            "[benchmarks/README.md](benchmarks/README.md#plots).")

