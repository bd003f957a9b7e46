"""Kernels chosen by measurement, at load, on the GPU that serves and at the model's shapes.

Whether a fused Triton kernel beats cuBLAS plus a separate pass depends on the GPU, the
shapes and the library versions, so nothing here assumes it: each candidate is run once
(which compiles and autotunes it), checked against the baseline (today's path), and timed
beside it. A candidate replaces the baseline only if it runs, agrees with it and is faster
by more than ``TIE_MARGIN``; so no op can end up slower than the baseline on a given GPU.
The choice and every timing are logged and kept in ``Ops.choices`` (shown by ``/info``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from rerank_kernels.linear_gelu import ROW_BUCKETS, linear_gelu_triton, tuned_config

log = logging.getLogger(__name__)

TIE_MARGIN = 0.03  # a candidate within 3% of the baseline is noise: the baseline stays
Timer = Callable[[Callable[[], object]], float]  # a no-argument call -> milliseconds per call


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median milliseconds per call on the current CUDA device. Triton's ``do_bench`` clears
    L2 before each call, as the model meets each layer's weights cold."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


@dataclass
class Choice:
    """What a measurement decided for one op at one shape."""

    chosen: str
    baseline: str
    timings_ms: dict[str, float]
    failed: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not timed
    detail: dict[str, str] = field(default_factory=dict)  # candidate -> e.g. its autotuned tile

    def report(self) -> dict:
        out = {"chosen": self.chosen, "baseline": self.baseline,
               "timings_ms": {name: round(ms, 4) for name, ms in self.timings_ms.items()}}
        if self.failed:
            out["failed"] = dict(self.failed)
        if self.detail:
            out["detail"] = dict(self.detail)
        return out


def close_to(atol: float, rtol: float) -> Callable[[torch.Tensor, torch.Tensor], str | None]:
    """A check for ``choose``: None when ``got`` matches ``expected``, else what differs."""
    def check(got: torch.Tensor, expected: torch.Tensor) -> str | None:
        if got.shape != expected.shape or got.dtype != expected.dtype:
            return f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(expected.shape)} {expected.dtype}"
        if not torch.isfinite(got).all():
            return "non-finite values"
        diff = (got.float() - expected.float()).abs()
        if (diff > atol + rtol * expected.float().abs()).any():
            return f"max abs diff {diff.max().item():.3g} from the baseline (atol {atol}, rtol {rtol})"
        return None
    return check


def choose(what: str, baseline: tuple[str, Callable], candidates: dict[str, Callable], args: tuple, *,
           timer: Timer, check: Callable[[torch.Tensor, torch.Tensor], str | None]) -> Choice:
    """Times ``baseline`` and each candidate on ``args``, keeps the fastest that is correct.

    The baseline is today's path and must run (its error propagates). A candidate that raises
    or disagrees with the baseline (``check`` returns a reason) is logged and left out."""
    base_name, base_fn = baseline
    expected = base_fn(*args)
    timings = {base_name: timer(lambda: base_fn(*args))}
    failed, detail = {}, {}
    for name, fn in candidates.items():
        try:
            problem = check(fn(*args), expected)  # the first call compiles (and autotunes)
            if problem is None:
                timings[name] = timer(lambda fn=fn: fn(*args))
        except Exception as e:  # a kernel that cannot run on this GPU must not stop the server
            problem = f"{e.__class__.__name__}: {e}"
        if problem is not None:
            failed[name] = problem
            log.warning("%s: candidate %s is not used, it failed at load: %s", what, name, problem)
    fastest = min((n for n in timings if n != base_name), key=timings.get, default=None)
    wins = fastest is not None and timings[fastest] < timings[base_name] * (1 - TIE_MARGIN)
    chosen = fastest if wins else base_name
    log.info("%s: %s chosen (%s)", what, chosen, ", ".join(f"{n} {ms:.4f} ms" for n, ms in timings.items()))
    return Choice(chosen, base_name, timings, failed, detail)


class ByRows:
    """An op picked per row tier: ``ops[i]`` for up to ``limits[i]`` rows, the last for more.
    Called like the ops it holds, ``(x, *args)`` with x (rows, ...)."""

    def __init__(self, limits: tuple[int, ...], ops: tuple[Callable, ...], names: tuple[str, ...]):
        assert len(ops) == len(names) == len(limits) + 1
        self.limits, self.ops, self.names = limits, ops, names

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        rows = x.shape[0]
        for limit, op in zip(self.limits, self.ops):
            if rows <= limit:
                return op(x, *args, **kwargs)
        return self.ops[-1](x, *args, **kwargs)

    def __repr__(self) -> str:
        tiers = [f"<={limit}: {name}" for limit, name in zip(self.limits, self.names)]
        return f"ByRows({', '.join(tiers)}, more: {self.names[-1]})"


FFN_UP = "ffn_up_gelu"  # the key in Ops.choices
FFN_BASELINE = "cublas+bias_gelu"
FFN_FUSED = "triton-fused"


def tier_names(limits: tuple[int, ...] = ROW_BUCKETS) -> list[str]:
    return [f"rows<={limit}" for limit in limits] + [f"rows>{limits[-1]}"]


def choose_ffn_up(ops, weight: torch.Tensor, bias: torch.Tensor, *, max_rows: int, timer: Timer | None = None,
                  fused: Callable = linear_gelu_triton):
    """-> ``ops`` whose ``linear_gelu`` is the faster of the baseline (``ops.linear_gelu``:
    cuBLAS, then the bias+GELU kernel) and the ``fused`` kernel, chosen per row tier (the
    last layer and small batches, mid-size, the FFN's full ``max_rows`` slices), each timed at
    its tier's largest row count; ``choices[FFN_UP]`` holds the report. weight (out, in) and
    bias (out,): one layer's up-projection (all layers share its shapes)."""
    timer, started = timer or cuda_timer, time.perf_counter()
    baseline = ops.linear_gelu
    limits = tuple(limit for limit in ROW_BUCKETS if limit < max_rows)
    chosen, report = [], {}
    g = torch.Generator(device=weight.device).manual_seed(0)
    for name, rows in zip(tier_names(limits), (*limits, max_rows)):
        # LayerNorm'd activations are about unit scale
        x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype, generator=g)
        choice = choose(f"FFN up-projection + GELU at {rows} x {weight.shape[1]} -> {weight.shape[0]}",
                        (FFN_BASELINE, baseline), {FFN_FUSED: fused}, (x, weight, bias), timer=timer,
                        check=close_to(*((2e-2, 2e-2) if weight.dtype != torch.float32 else (1e-3, 1e-3))))
        if FFN_FUSED in choice.timings_ms:
            config = tuned_config(x, weight) if fused is linear_gelu_triton else None
            if config:
                choice.detail[FFN_FUSED] = config
        report[name] = {"rows_timed": rows, **choice.report()}
        chosen.append(choice.chosen)
    by_name = {FFN_BASELINE: baseline, FFN_FUSED: fused}
    if set(chosen) == {FFN_BASELINE}:
        measured = ops.measured_linear_gelu  # unchanged: the baseline everywhere
    elif len(set(chosen)) == 1:
        measured = by_name[chosen[0]]
    else:
        measured = ByRows(limits, tuple(by_name[c] for c in chosen), tuple(chosen))
    log.info("FFN up-projection measured in %.1fs: %s", time.perf_counter() - started,
             ", ".join(f"{tier} {c}" for tier, c in zip(report, chosen)))
    return dataclasses.replace(ops, measured_linear_gelu=measured, choices={**ops.choices, FFN_UP: report})
