"""CUDA kernels chosen by measurement, at load (by ``select_ops``), on the GPU that serves and
at the model's shapes (random weights of them: the model is built after the choice).

Whether a fused Triton kernel beats cuBLAS plus a separate pass depends on the GPU, the
shapes and the library versions, so nothing here assumes it: each candidate is run once
(which compiles and autotunes it), checked against the baseline (today's path), and timed
beside it. A candidate replaces the baseline only if it runs, agrees with it and is faster
by more than ``TIE_MARGIN``; so no op can end up slower than the baseline on a given GPU.
The choice and every timing are logged and kept in ``Ops.choices`` (shown by ``/info``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rerank_kernels.attention import attention_block_m, attention_config_candidates, varlen_attention_triton
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
        for limit, op in zip(self.limits, self.ops[:-1], strict=True):
            if rows <= limit:
                return op(x, *args, **kwargs)
        return self.ops[-1](x, *args, **kwargs)

    def __repr__(self) -> str:
        tiers = [f"<={limit}: {name}" for limit, name in zip(self.limits, self.names[:-1], strict=True)]
        return f"ByRows({', '.join(tiers)}, more: {self.names[-1]})"


FFN_UP = "ffn_up_gelu"  # the key in Ops.choices
FFN_BASELINE = "cublas+bias_gelu"
FFN_FUSED = "triton-fused"


def tier_names(limits: tuple[int, ...] = ROW_BUCKETS) -> list[str]:
    return [f"rows<={limit}" for limit in limits] + [f"rows>{limits[-1]}" if limits else "all rows"]


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
    for name, rows in zip(tier_names(limits), (*limits, max_rows), strict=True):
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
             ", ".join(f"{tier} {c}" for tier, c in zip(report, chosen, strict=True)))
    return dataclasses.replace(ops, measured_linear_gelu=measured, choices={**ops.choices, FFN_UP: report})


ATTENTION = "attention"  # the key in Ops.choices
ATTENTION_BASELINE = "default"


def attention_workloads(heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                        tokens: int = 16384) -> dict[int, tuple]:
    """BLOCK_M tier -> one representative batch of ``varlen_attention`` arguments, ``tokens``
    keys each (the server's batch budget), ragged lengths: the last layer's first-token
    queries (tier 16), short pairs of 40-64 tokens (tier 64), pairs of 200-300 tokens (the
    widest tier: 128, or 64 above head_dim 64, where it replaces the short pairs). Q, K and V
    are views into one fused tensor, as the model passes them."""
    g = torch.Generator(device=device).manual_seed(0)

    def lengths(low: int, high: int) -> list[int]:
        found, total = [], 0
        while total < tokens:
            found.append(low + (len(found) * 37) % (high - low + 1))
            total += found[-1]
        return found

    def cu(ls: list[int]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=device)

    def fused(n: int, parts: int) -> torch.Tensor:
        return torch.randn(n, parts, heads, head_dim, device=device, dtype=dtype, generator=g)

    scale = head_dim ** -0.5
    last = lengths(200, 300)
    kv = fused(sum(last), 2)
    q = torch.randn(len(last), heads, head_dim, device=device, dtype=dtype, generator=g)
    workloads = {16: (q, kv[:, 0], kv[:, 1], torch.arange(len(last) + 1, dtype=torch.int32, device=device),
                      cu(last), 1, max(last), scale)}
    for low, high in ((40, 64), (200, 300)):
        ls = lengths(low, high)
        qkv = fused(sum(ls), 3)
        workloads[attention_block_m(high, head_dim)] = (qkv[:, 0], qkv[:, 1], qkv[:, 2], cu(ls), cu(ls), high,
                                                        high, scale)
    return workloads


def choose_attention_configs(ops, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, *,
                             timer: Timer | None = None, workloads: dict[int, tuple] | None = None,
                             kernel: Callable | None = None):
    """-> ``ops`` whose Triton varlen attention uses, per query tier, the fastest correct
    launch configuration (``attention_config_candidates``) where one beats the default by
    more than TIE_MARGIN; ``choices[ATTENTION]`` holds the report. Only when the op set's
    attention backend is the Triton kernel (flash-attn and torch's varlen have their own).
    ``kernel``: ``varlen_attention_triton`` (or a stand-in taking the same ``configs=``)."""
    kernel = kernel or varlen_attention_triton
    if ops.attention_backend != "triton":
        log.info("attention configurations not measured: the backend is %s", ops.attention_backend)
        return ops
    timer, started = timer or cuda_timer, time.perf_counter()
    workloads = workloads or attention_workloads(heads, head_dim, dtype, device)
    configs, report = {}, {}
    for block_m, args in sorted(workloads.items()):
        candidates = {name: functools.partial(kernel, configs={block_m: config})
                      for name, config in attention_config_candidates(head_dim, block_m).items()}
        total_q, total_k = args[0].shape[0], args[1].shape[0]
        choice = choose(f"Triton attention, query tier {block_m} ({total_q} queries, {total_k} keys, "
                        f"head_dim {head_dim})", (ATTENTION_BASELINE, kernel), candidates, args,
                        timer=timer, check=close_to(1e-2, 1e-2))
        if choice.chosen != ATTENTION_BASELINE:
            configs[block_m] = attention_config_candidates(head_dim, block_m)[choice.chosen]
        report[f"block_m={block_m}"] = choice.report()
    log.info("attention configurations measured in %.1fs: %s", time.perf_counter() - started,
             ", ".join(f"{tier} {r['chosen']}" for tier, r in report.items()))
    attention = functools.partial(kernel, configs=configs) if configs else ops.varlen_attention
    return dataclasses.replace(ops, varlen_attention=attention, choices={**ops.choices, ATTENTION: report})


def tune_ops(ops, up_weight: torch.Tensor, up_bias: torch.Tensor, *, heads: int, max_rows: int,
             timer: Timer | None = None, fused: Callable = linear_gelu_triton,
             attention_kernel: Callable | None = None):
    """Every load-time measurement for a model on CUDA: the FFN up-projection (``choose_ffn_up``)
    and the Triton attention's configurations (``choose_attention_configs``). up_weight
    (intermediate, hidden), up_bias (intermediate,): one layer's, in the model's dtype.
    ``fused`` and ``attention_kernel``: the kernels measured (stand-ins in tests)."""
    ops = choose_ffn_up(ops, up_weight, up_bias, max_rows=max_rows, timer=timer, fused=fused)
    return choose_attention_configs(ops, heads, up_weight.shape[1] // heads, up_weight.dtype, up_weight.device,
                                    timer=timer, kernel=attention_kernel)


def measure_cuda_ops(ops, hidden: int, intermediate: int, heads: int, dtype: torch.dtype, device: torch.device, *,
                     max_rows: int, timer: Timer | None = None, fused: Callable = linear_gelu_triton):
    """``tune_ops`` on random weights of a model's shapes (before the model exists; called by
    ``select_ops``): an up-projection (intermediate, hidden) scaled as trained weights are.
    ``fused``: the kernel measured (a stand-in in tests)."""
    started, g = time.perf_counter(), torch.Generator(device=device).manual_seed(0)
    up_weight = torch.randn(intermediate, hidden, device=device, generator=g).mul_(0.02).to(dtype)
    up_bias = torch.randn(intermediate, device=device, generator=g).to(dtype)
    ops = tune_ops(ops, up_weight, up_bias, heads=heads, max_rows=max_rows, timer=timer, fused=fused)
    log.info("CUDA kernels measured in %.1fs", time.perf_counter() - started)
    return ops
