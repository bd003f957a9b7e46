"""The model's GEMMs: ``F.linear`` (the reference) and, on the CPU, oneDNN with the weight
reordered once, chosen per weight kind by measurement at load (``choose_cpu_gemms``).

A GEMM is built once from its weight by a *packer*, ``packer(weight (out, in), bias (out,))``,
and then called as ``linear(x (rows, in)) -> (rows, out)``; the model never sees how the
weight is stored (oneDNN's reordered weights are opaque: no slicing, no ``F.linear`` on them).

Batch invariance comes first: a pair's score must not depend on what shares its batch, so a
candidate whose rows change with the number of rows M (MKL's sgemm at small M on AMD CPUs;
oneDNN fp32 at M=1 for K >= 1280, which ``OneDnnLinear`` avoids by padding to two rows) is
not chosen however fast it is. The check runs at load on random weights of the model's shapes.

With --dtype int8 the layers' candidates are int8 GEMMs (rerank_kernels.linear_int8: oneDNN's
quantized linear and ``torch._int_mm``, weights per output channel, activations per row),
chosen the same way; the head stays fp32 with the float candidates.
"""
from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rerank_kernels.linear_gelu import linear_gelu_unfused
from rerank_kernels.linear_int8 import (
    Int8Linear,
    IntMmLinear,
    OneDnnInt8Linear,
    dequantized_reference,
    onednn_int8_missing,
)

log = logging.getLogger(__name__)

# Weight kinds: each gets one GEMM choice, whatever the batch's row count.
QKV = "qkv"  # (3 * hidden, hidden), every layer but the last
FIRST_TOKEN_QUERY = "first_token_query"  # (hidden, hidden): the last layer's queries, first tokens only
KEY_VALUE = "key_value"  # (2 * hidden, hidden): the last layer's keys and values
ATTENTION_OUT = "attention_out"  # (hidden, hidden)
FFN_UP = "ffn_up_gelu"  # (intermediate, hidden), bias and exact GELU fused
FFN_DOWN = "ffn_down"  # (hidden, intermediate)
HEAD_DENSE = "head_dense"  # (hidden, hidden), fp32
HEAD_OUT = "head_out"  # (1, hidden), fp32

TORCH, ONEDNN = "torch", "onednn"  # in int8: torch._int_mm, oneDNN's quantized linear
CPU_GEMM_CHOICES = ("auto", ONEDNN, TORCH)  # --cpu-gemm
TIE_MARGIN = 0.03  # oneDNN must be this much faster to replace the reference
INT8_LARGE_ROWS = 2048  # int8 kinds are also timed at this many rows (see choose_cpu_gemms)
TIMING_ROUNDS = 3  # rounds of interleaved timing where two candidates passed the screen
MKLDNN = torch.ops.mkldnn  # a module attribute, so that a test can take the private ops away


@dataclass(frozen=True)
class GemmShape:
    kind: str
    out_features: int
    in_features: int
    gelu: bool = False  # the output is gelu_erf(x @ weight^T + bias)
    fp32: bool = False  # computed in fp32 whatever the model's dtype (the head)


def gemm_shapes(hidden: int, intermediate: int) -> list[GemmShape]:
    """Every GEMM kind of the XLM-R forward at a model's sizes."""
    return [GemmShape(QKV, 3 * hidden, hidden), GemmShape(FIRST_TOKEN_QUERY, hidden, hidden),
            GemmShape(KEY_VALUE, 2 * hidden, hidden), GemmShape(ATTENTION_OUT, hidden, hidden),
            GemmShape(FFN_UP, intermediate, hidden, gelu=True), GemmShape(FFN_DOWN, hidden, intermediate),
            GemmShape(HEAD_DENSE, hidden, hidden, fp32=True), GemmShape(HEAD_OUT, 1, hidden, fp32=True)]


class PlainLinear:
    """The weight as loaded, computed by ``fn(x, weight, bias)``: ``F.linear``, or a linear
    followed by bias + GELU (e.g. ``Ops.linear_gelu``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fn: Callable = F.linear):
        self.weight, self.bias, self.fn = weight, bias, fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.bias)

    def __repr__(self) -> str:
        return f"PlainLinear({tuple(self.weight.shape)}, {getattr(self.fn, '__name__', self.fn)})"


def onednn_missing() -> str | None:
    """None when torch has the oneDNN linear ops used here (private: torch 2.x CPU builds), else why not."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    missing = [op for op in ("_reorder_linear_weight", "_linear_pointwise") if not hasattr(MKLDNN, op)]
    return f"torch {torch.__version__} lacks torch.ops.mkldnn.{' and '.join(missing)}" if missing else None


class OneDnnLinear:
    """The weight reordered once into oneDNN's blocked layout (the plain one can then be
    freed); bias and the exact erf GELU run inside the GEMM (``attr="gelu", algorithm="none"``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False):
        self.out_features = weight.shape[0]
        self.weight = MKLDNN._reorder_linear_weight(weight.contiguous(), None)
        self.bias = None if bias is None else bias.contiguous()
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            # A single row takes another kernel than M >= 2 (its result differs for K >= 1280 in
            # fp32): two rows keep it equal to the same row in any batch.
            return self(x.expand(2, -1))[:1]
        return MKLDNN._linear_pointwise(x.contiguous(), self.weight, self.bias, self.attr, [], self.algorithm)

    def __repr__(self) -> str:
        return f"OneDnnLinear({self.out_features}, {self.attr})"


def torch_packer(shape: GemmShape, bias_gelu: Callable) -> Callable:
    """The reference packer: ``F.linear``, then ``bias_gelu`` for the FFN's up-projection."""
    if shape.gelu:
        linear_gelu = functools.partial(linear_gelu_unfused, bias_gelu=bias_gelu)
        return lambda weight, bias: PlainLinear(weight, bias, linear_gelu)
    return PlainLinear


def onednn_packer(shape: GemmShape) -> Callable:
    return (lambda weight, bias: OneDnnLinear(weight, bias, gelu=True)) if shape.gelu else OneDnnLinear


def cpu_timer(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median milliseconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


# (first row, rows) slices compared with the same rows of one larger call: single rows at 32
# places (one row alone is the commonest trap, and whether a row differs depends on its data),
# every count up to 16 at three places (a kernel's choice can change at any small M), and a few
# larger odd counts. About four full calls in all.
INVARIANCE_SLICES = (*((start, 1) for start in range(0, 256, 8)),
                     *((start, rows) for rows in range(2, 17) for start in (0, 37, 101)),
                     (0, 23), (0, 40), (3, 60), (100, 33), (1, 255))


def invariance_problem(linear: Callable, x: torch.Tensor) -> str | None:
    """None when every row of ``linear(x[a:a+m])`` is bitwise equal to that row of ``linear(x)``
    (x (rows, in), rows >= 256), else which slice differed."""
    full = linear(x)
    for start, rows in INVARIANCE_SLICES:
        if not torch.equal(linear(x[start:start + rows]), full[start:start + rows]):
            return f"rows {start}..{start + rows - 1} computed alone differ from the same rows of {x.shape[0]}"
    return None


def accuracy_problem(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None when ``got`` matches the float64 ``expected`` to the rounding of ``dtype``. In int8
    ``expected`` is the GEMM of the quantized operands (``dequantized_reference``): the tolerance
    leaves room for an activation rounded the other way at an exact tie, no more."""
    tolerance = {torch.float32: 1e-4, torch.int8: 1e-2}.get(dtype, 2e-2)
    diff = (got.double() - expected).abs()
    if not torch.isfinite(got).all() or (diff > tolerance * (1 + expected.abs())).any():
        return f"max abs diff {diff.max().item():.3g} from a float64 reference"
    return None


def int8_packers(shape: GemmShape) -> dict[str, Callable]:
    """The int8 candidates; the FFN's up-projection adds bias and GELU in the epilogue."""
    return {TORCH: lambda weight, bias: IntMmLinear(weight, bias, shape.gelu),
            ONEDNN: lambda weight, bias: OneDnnInt8Linear(weight, bias, shape.gelu)}


def _kind_dtype(shape: GemmShape, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a kind's weights and activations (int8: its activations are float32)."""
    return torch.float32 if shape.fp32 or dtype == torch.int8 else dtype


def _candidates(shape: GemmShape, bias_gelu: Callable, dtype: torch.dtype = torch.float32) -> dict[str, Callable]:
    if dtype == torch.int8 and not shape.fp32:
        return int8_packers(shape)
    return {TORCH: torch_packer(shape, bias_gelu), ONEDNN: onednn_packer(shape)}


def _onednn_missing(shapes: list[GemmShape], dtype: torch.dtype) -> str | None:
    """Why some kind's oneDNN candidate cannot run, if so (int8 layers need the quantized ops)."""
    return onednn_missing() or (onednn_int8_missing() if dtype == torch.int8 and shapes else None)


def choose_cpu_gemms(shapes: list[GemmShape], dtype: torch.dtype, bias_gelu: Callable, *, pinned: str = "auto",
                     rows: int = 256, large_rows: int = INT8_LARGE_ROWS,
                     timer: Callable[[Callable[[], object]], float] = cpu_timer,
                     ) -> tuple[dict[str, Callable], dict]:
    """-> (kind -> packer, report): per weight kind the faster of ``F.linear`` and oneDNN among
    those that are correct and batch-invariant, timed at ``rows`` rows on random weights of the
    kind's shape in ``dtype`` (fp32 for the head; in int8 the layers choose between
    ``torch._int_mm`` and oneDNN's int8 linear, timed at ``large_rows`` rows too: their order
    flips with the row count, e.g. the FFN's up-projection at 2 threads: ``_int_mm`` ahead at 256
    rows, oneDNN 1.6x faster at 4,096; the sum of the time per row at both sizes decides).
    ``pinned`` (--cpu-gemm) skips the measurement: "torch" or "onednn" for every kind (ValueError
    where torch lacks oneDNN's ops)."""
    if pinned not in CPU_GEMM_CHOICES:
        raise ValueError(f"--cpu-gemm must be one of {', '.join(CPU_GEMM_CHOICES)}, got {pinned!r}")
    started, missing = time.perf_counter(), _onednn_missing(shapes, dtype)
    if pinned == ONEDNN and missing:
        raise ValueError(f"--cpu-gemm onednn: {missing}; use --cpu-gemm torch or auto")
    if pinned != "auto" or missing:
        chosen = TORCH if missing else pinned
        why = f"pinned by --cpu-gemm {pinned}" if pinned != "auto" else f"oneDNN unavailable: {missing}"
        if missing:
            log.warning("CPU GEMMs: F.linear everywhere (%s); scores may depend on the batch", why)
        else:
            log.info("CPU GEMMs: %s everywhere, %s (not measured)", chosen, why)
        return ({s.kind: _candidates(s, bias_gelu, dtype)[chosen] for s in shapes},
                {"reason": why, "by_kind": {s.kind: {"chosen": chosen} for s in shapes}})
    g = torch.Generator().manual_seed(0)
    packers, report = {}, {}
    for shape in shapes:
        kind_dtype = _kind_dtype(shape, dtype)
        int8 = dtype == torch.int8 and not shape.fp32
        # unit-scale activations (they come out of a LayerNorm) and weights scaled as trained ones
        weight = (torch.randn(shape.out_features, shape.in_features, generator=g) * 0.02).to(kind_dtype)
        bias = torch.randn(shape.out_features, generator=g).to(kind_dtype)
        x = torch.randn(rows, shape.in_features, generator=g).to(kind_dtype)
        if int8:
            expected = dequantized_reference(x, weight, bias, gelu=shape.gelu)
        else:
            expected = F.linear(x.double(), weight.double(), bias.double())
            expected = F.gelu(expected) if shape.gelu else expected
        timings, large, failed, passed = {}, {}, {}, {}
        if int8 and large_rows:
            x_large = torch.randn(large_rows, shape.in_features, generator=g)
        for name, packer in _candidates(shape, bias_gelu, dtype).items():
            try:
                linear = packer(weight, bias)
                problem = (accuracy_problem(linear(x), expected, torch.int8 if int8 else kind_dtype)
                           or invariance_problem(linear, x))
            except Exception as e:  # a private op that fails on this CPU must not stop the server
                problem = f"{e.__class__.__name__}: {e}"
                log.warning("%s GEMM: candidate %s failed at load: %s", shape.kind, name, problem)
            if problem is None:
                passed[name] = linear
            else:
                failed[name] = problem
        # the candidates that passed, timed in turn for TIMING_ROUNDS rounds, each at its best
        # round: a burst of load on the machine then slows every candidate alike, not the one
        # that happened to be timed during it
        for _ in range(TIMING_ROUNDS if len(passed) > 1 else 1):
            for name, linear in passed.items():
                t = timer(lambda linear=linear, x=x: linear(x))
                timings[name] = min(t, timings.get(name, t))
                if int8 and large_rows:
                    t = timer(lambda linear=linear, x=x_large: linear(x))
                    large[name] = min(t, large.get(name, t))
        cost = {n: ms / rows + (large[n] / large_rows if n in large else 0.0) for n, ms in timings.items()}
        if ONEDNN in cost and (TORCH not in cost or cost[ONEDNN] < cost[TORCH] * (1 - TIE_MARGIN)):
            chosen = ONEDNN
        else:
            chosen = TORCH
        if not timings:
            log.warning("%s GEMM: no candidate is batch-invariant (%s); F.linear is used and scores may depend "
                        "on the batch", shape.kind, "; ".join(f"{n}: {p}" for n, p in failed.items()))
        packers[shape.kind] = _candidates(shape, bias_gelu, dtype)[chosen]
        gflops = {n: 2 * rows * shape.in_features * shape.out_features / ms / 1e6 for n, ms in timings.items()}
        report[shape.kind] = {"chosen": chosen, "timings_ms": {n: round(ms, 3) for n, ms in timings.items()},
                              "gflops": {n: round(v, 1) for n, v in gflops.items()},
                              **({f"gflops_at_{large_rows}_rows": {
                                  n: round(2 * large_rows * shape.in_features * shape.out_features / ms / 1e6, 1)
                                  for n, ms in large.items()}} if large else {}),
                              "shape": f"{shape.in_features} -> {shape.out_features} "
                                       f"{'int8' if int8 else str(kind_dtype).removeprefix('torch.')}"}
        if failed:
            report[shape.kind]["not_chosen"] = failed
    seconds = time.perf_counter() - started
    log.info("CPU GEMMs measured in %.2fs (%s, %d threads): %s", seconds, str(dtype).removeprefix("torch."),
             torch.get_num_threads(), "; ".join(
                 f"{kind} {r['chosen']} (" + ", ".join([*(f"{n} {gf:.0f} GFLOP/s" for n, gf in r["gflops"].items()),
                                                         *(f"{n} refused" for n in r.get("not_chosen", {}))]) + ")"
                 for kind, r in report.items()))
    return packers, {"measured_in_s": round(seconds, 3), "threads": torch.get_num_threads(), "rows_timed": rows,
                     "by_kind": report}


def linear_add_layernorm(linear, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float, add_layernorm: Callable,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """add_layernorm(linear(x), residual, weight, bias, eps, out=out): an int8 GEMM ends in the
    residual and the LayerNorm within its epilogue's one pass (Int8Linear.add_layernorm)."""
    if isinstance(linear, Int8Linear):
        return linear.add_layernorm(x, residual, weight, bias, eps, out)
    return add_layernorm(linear(x), residual, weight, bias, eps, out=out)


def feed_forward(up, down, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                 add_layernorm: Callable) -> torch.Tensor:
    """x = LayerNorm(down(up(x)) + x), written over x (rows, hidden). Between two int8 GEMMs with
    the C glue, up's epilogue quantizes its GELU output row by row for down, so the (rows,
    intermediate) activation is never float32, and down's epilogue adds and normalizes."""
    if isinstance(up, Int8Linear) and isinstance(down, Int8Linear):
        hidden = up.quantized(x, down.input_offset)
    else:
        hidden = up(x)
    return linear_add_layernorm(down, hidden, x, weight, bias, eps, add_layernorm, out=x)
