"""FFN up-projection with bias and exact (erf) GELU in the matmul's epilogue.

``gelu_erf(x @ W^T + b)``: the (rows, intermediate) activation, the forward's largest tensor,
is written once in the model's dtype, instead of a GEMM writing it, then a bias+GELU pass
reading and writing it again. cuBLAS(Lt) has bias+GELU epilogues for the tanh form only; the
checkpoint was trained with the erf form, hence our own kernel. Whether it beats cuBLAS plus
the separate pass depends on the GPU, so ``rerank_kernels.tuning`` times both at load.
"""
import inspect
import os

import torch
import torch.nn.functional as F

from rerank_kernels._triton import HAS_TRITON, cuda_grid, require_triton, tl, triton
from rerank_kernels.gelu import bias_gelu_torch


def linear_gelu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reference. x (rows, in), weight (out, in), bias (out,) -> gelu_erf(x @ weight^T + bias)
    (rows, out) in x's dtype, computed in fp32."""
    return F.gelu(F.linear(x.float(), weight.float(), bias.float()), approximate="none").to(x.dtype)


def linear_gelu_unfused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        bias_gelu=bias_gelu_torch) -> torch.Tensor:
    """Today's path and the baseline the fused kernel must beat: the GEMM without bias
    (cuBLAS on CUDA, MKL on the CPU), then the op set's bias+GELU pass. Same contract as
    ``linear_gelu_torch``."""
    return bias_gelu(F.linear(x, weight), bias)


# ----------------------------------------------------------------------------- Triton

ROW_BUCKETS = (64, 512)  # autotuning tiers by row count: <= 64, <= 512, more (see rows_bucket)


def rows_bucket(rows: int) -> int:
    """The autotuning tier of a row count: the last layer and small batches (<= 64 rows:
    few row blocks, so narrow column tiles keep every SM streaming W), mid-size (<= 512),
    and the FFN's full slices. Tuning per exact row count would re-tune on every new batch."""
    for limit in ROW_BUCKETS:
        if rows <= limit:
            return limit
    return 1 << 30


@triton.jit(do_not_specialize=["M", "rows_bucket"])
def _linear_gelu_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, x_stride, w_stride, out_stride,
    rows_bucket,  # autotuning key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile per program: fp32 accumulator over K, then bias and
    GELU in fp32 and one downcast at the store."""
    # Grouped order: GROUP_M row blocks run together over each column block, so the W tiles
    # they share are still in L2 (the Triton matmul tutorial's scheme).
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns of the last tiles read a wrapped valid row instead of being
    # masked (the store masks them): the main loop then needs no mask unless K is ragged.
    rows = (offs_m % M).to(tl.int64)  # int64: rows * stride can pass 2**31
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * x_stride + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * w_stride + offs_k[:, None]  # a (BLOCK_K, BLOCK_N) tile of W^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        if IEEE:  # fp32 inputs (tests): no TF32 rounding
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    h = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # exact GELU, x * Phi(x)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _config(m, n, k, group, stages, warps):
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group, "num_stages": stages, "num_warps": warps}


# Tile candidates for the model's shapes (N = 4096, K = 1024, fp16), sized for Hopper
# (228 KB shared memory: 128x256x64 with 3 stages is 144 KB) and Ampere (164 KB: 4 stages
# of 128x128x64 is 128 KB); a config that does not fit a GPU fails to compile and the
# autotuner skips it. Narrow tiles serve the few-row tiers, where W's bandwidth is the limit.
AUTOTUNE_CONFIGS = [
    _config(128, 256, 64, 8, 3, 8),
    _config(256, 128, 64, 8, 3, 8),
    _config(128, 128, 64, 8, 4, 4),
    _config(128, 128, 32, 8, 4, 4),
    _config(128, 64, 64, 8, 4, 4),
    _config(64, 128, 64, 8, 4, 4),
    _config(64, 64, 64, 8, 4, 4),
    _config(32, 64, 128, 8, 4, 4),
    _config(16, 64, 128, 8, 4, 4),
    _config(16, 128, 64, 8, 5, 4),
]
# Small enough that the interpreter tests' tiny shapes span several tiles and K steps.
INTERPRETER_CONFIG = _config(16, 32, 16, 2, 1, 1)


def _prune_for_rows(configs, named_args, **kwargs):
    """Only tiles sized for the call's row tier: no 256-row tiles for 30 rows, no 16-row
    tiles for 4096 (each pruned config is one fewer compile and benchmark at load)."""
    bucket = named_args["rows_bucket"]
    limit_m, floor_m = (64, 16) if bucket <= 64 else ((128, 32) if bucket <= 512 else (256, 64))
    kept = [c for c in configs if floor_m <= c.kwargs["BLOCK_M"] <= limit_m]
    return kept or configs


def _even_k(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


if HAS_TRITON:
    _linear_gelu_heuristic = triton.heuristics({"EVEN_K": _even_k})(_linear_gelu_kernel)
    # Tuning results kept in Triton's cache dir (a volume in the image), so a restart does not
    # benchmark again; where this Triton has that option.
    _cache = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    _linear_gelu_autotuned = triton.autotune(
        configs=[triton.Config({k: v for k, v in c.items() if k.isupper()},
                               num_stages=c["num_stages"], num_warps=c["num_warps"]) for c in AUTOTUNE_CONFIGS],
        key=["rows_bucket", "N", "K"],  # the autotuner adds every tensor's dtype
        prune_configs_by={"early_config_prune": _prune_for_rows},
        **_cache,
    )(_linear_gelu_heuristic)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _linear_gelu_launch(x, weight, bias, config):
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    args = (x, weight, bias, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0), rows_bucket(M))

    def grid(meta):
        return cuda_grid(triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]))

    ieee = x.dtype == torch.float32
    if config is None and not _interpreting():
        _linear_gelu_autotuned[grid](*args, IEEE=ieee)
    else:  # the interpreter cannot time configs (no CUDA events): a fixed one, or the caller's
        _linear_gelu_heuristic[grid](*args, IEEE=ieee, **(config or INTERPRETER_CONFIG))
    return out


def linear_gelu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       config: dict | None = None) -> torch.Tensor:
    """Fused kernel, same contract as ``linear_gelu_torch``: x (rows, in) (any row stride),
    weight (out, in), bias (out,) -> gelu_erf(x @ weight^T + bias) (rows, out) in x's dtype,
    fp32 accumulation. ``config`` (one of ``AUTOTUNE_CONFIGS``) skips autotuning; by default
    the autotuner picks a tile per row tier, N, K and dtype on the first call of each."""
    require_triton()
    if x.shape[-1] != weight.shape[-1] or bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_gelu: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{tuple(bias.shape)} do not fit (rows, in) @ (out, in)^T + (out,)")
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _linear_gelu_launch(x, weight.contiguous(), bias.contiguous(), config)


def tuned_config(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The tile the autotuner chose for this call's tier, shapes and dtype (None before the
    first call of that tier), for the load-time report."""
    if not HAS_TRITON:
        return None
    wanted = (rows_bucket(x.shape[0]), weight.shape[0], x.shape[1])
    found = [c for key, c in _linear_gelu_autotuned.cache.items() if key[:3] == wanted and str(x.dtype) in key]
    return str(found[0]) if found else None
