"""Micro-benchmark of the CPU attention: one SDPA call per sequence against
``varlen_attention_torch`` (one call per group of equal-length sequences), on the layouts the
model passes (q, k, v views into the fused QKV), all queries and the last layer's first token.

    python -m benchmarks.attention            # ~1 min on 2 cores
    python -m benchmarks.attention --reps 50

Timings interleave the two functions and keep each one's fastest run (the machine is shared:
the minimum is the least disturbed); ``others`` is the CPU the rest of the machine used meanwhile.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.measure import MachineLoad
from benchmarks.workloads import mixed_lengths
from rerank_kernels.attention import varlen_attention_torch


def per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """The previous CPU path: one SDPA call per sequence on views, (total_q, heads, dim)."""
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        qs, qe, ks, ke = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                           v[ks:ke].transpose(0, 1)[None], scale=scale)
        out[qs:qe] = o[0].transpose(0, 1)
    return out


def workloads(seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {
        "64 short pairs, 20..60 tokens": [int(x) for x in rng.integers(20, 61, 64)],
        "128 pairs x 32 tokens": [32] * 128,
        "16 docs x 256 tokens": [256] * 16,
        "16 mixed docs (lognormal, 16..2048)": mixed_lengths(rng, 16),
    }


def arguments(lengths: list[int], heads: int, dim: int, dtype: torch.dtype, first_token_only: bool) -> tuple:
    fused = torch.randn(sum(lengths), 3, heads, dim).to(dtype)
    q, k, v = fused[:, 0], fused[:, 1], fused[:, 2]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    if first_token_only:
        q = q[cu[:-1].long()]
        return q, k, v, torch.arange(len(lengths) + 1, dtype=torch.int32), cu, 1, max(lengths), dim ** -0.5
    return q, k, v, cu, cu, max(lengths), max(lengths), dim ** -0.5


def fastest_of_each(fns: list, args: tuple, reps: int) -> tuple[list[float], float]:
    """Each function's fastest of ``reps`` interleaved runs, and the rest of the machine's peak CPUs."""
    best, foreign = [float("inf")] * len(fns), 0.0
    for fn in fns:
        fn(*args)  # warm-up
    for _ in range(reps):
        for i, fn in enumerate(fns):
            with MachineLoad() as load:
                fn(*args)
            best[i] = min(best[i], load.wall)
            foreign = max(foreign, load.foreign_cpus or 0.0)
    return best, foreign


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fastest of {args.reps} interleaved runs")
    print(f"{'workload':36} {'heads x dim':>11} {'dtype':>8} {'queries':>8} {'per sequence':>13} {'grouped':>9} "
          f"{'speed-up':>8} {'others':>6}")
    for name, lengths in workloads(args.seed).items():
        for heads, dim in ((12, 32), (16, 64)):  # the small model's, the full model's
            for dtype in (torch.float32, torch.bfloat16):
                for first in (False, True):
                    a = arguments(lengths, heads, dim, dtype, first)
                    (t_loop, t_group), foreign = fastest_of_each([per_sequence, varlen_attention_torch], a, args.reps)
                    print(f"{name:36} {f'{heads} x {dim}':>11} {str(dtype).removeprefix('torch.'):>8} "
                          f"{'first' if first else 'all':>8} {t_loop * 1e3:10.2f} ms {t_group * 1e3:6.2f} ms "
                          f"{t_loop / t_group:7.2f}x {foreign:6.2f}", flush=True)


if __name__ == "__main__":
    main()
