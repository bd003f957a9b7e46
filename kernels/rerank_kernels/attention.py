"""Non-causal varlen attention over unpadded sequences.

Queries and keys may use different offsets: the last encoder layer asks only
each sequence's first token (``cu_seqlens_q = arange(batch + 1)``, ``max_seqlen_q = 1``)
against all of its keys.
"""
import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rerank_kernels._triton import HAS_TRITON, cuda_grid, require_triton, tl, triton

# At least GROUP_MIN_SEQS sequences of equal length, each at most GROUP_MAX_LEN keys long, share
# one SDPA call; the others get one call each on views (no copies). A group's gather and scatter
# copy q, k, v and the output once more: that costs more than the ~30 us saved per call for
# pairs of sequences, and is lost in the attention itself above a few hundred tokens
# (measured on a 2-core Zen 5: python -m benchmarks.attention).
GROUP_MIN_SEQS = 4
GROUP_MAX_LEN = 256


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> torch.Tensor:
    """Reference and CPU path: one SDPA call per group of sequences of equal length, nothing padded.

    q (total_q, heads, head_dim), k/v (total_k, heads, head_dim),
    cu_seqlens_* (batch + 1,) int32 -> (total_q, heads, head_dim).

    Batch invariant: a sequence's output is bitwise the same alone, in any group and at any
    position (tests/test_attention_torch.py). PyTorch's fused CPU flash kernel works per
    (sequence, head, query block), so a group of equal-length sequences gives each what it gets
    alone. With one query row (the last layer's first tokens) it is not: its split of the keys
    over threads follows the group's size (fp32), and a matmul-softmax-matmul is not either
    (MKL's batched GEMM), so one-row queries keep one call per sequence."""
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(len(starts_q) - 1):
        len_q, len_k = starts_q[i + 1] - starts_q[i], starts_k[i + 1] - starts_k[i]
        if len_q:
            groups.setdefault((len_q, len_k), []).append(i)
    for (len_q, len_k), seqs in groups.items():
        if len(seqs) < GROUP_MIN_SEQS or len_k > GROUP_MAX_LEN or len_q == 1:
            for i in seqs:  # views, no copies: (1, heads, len, dim)
                qs, ks = starts_q[i], starts_k[i]
                o = _attend(_heads_first(q[qs:qs + len_q]), _heads_first(k[ks:ks + len_k]),
                            _heads_first(v[ks:ks + len_k]), scale)
                out[qs:qs + len_q] = o[0].transpose(0, 1)
            continue
        rows_q = _token_rows(starts_q, seqs, len_q, q.device)
        rows_k = _token_rows(starts_k, seqs, len_k, q.device)
        n = len(seqs)
        o = _attend(_gather_heads_first(q, rows_q, n), _gather_heads_first(k, rows_k, n),
                    _gather_heads_first(v, rows_k, n), scale)
        out.index_copy_(0, rows_q, o.transpose(1, 2).reshape(n * len_q, *q.shape[1:]))
    return out


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(len, heads, dim) -> the view (1, heads, len, dim)."""
    return x.transpose(0, 1)[None]


def _token_rows(starts: list[int], seqs: list[int], length: int, device: torch.device) -> torch.Tensor:
    """The token rows of sequences ``seqs`` (each ``length`` long), in order: (len(seqs) * length,) int64."""
    first = torch.tensor([starts[i] for i in seqs], dtype=torch.int64)
    return (first[:, None] + torch.arange(length)).reshape(-1).to(device)


def _gather_heads_first(x: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of x (total, heads, dim) -> (n, heads, len, dim), one copy."""
    return x.index_select(0, rows).view(n, -1, *x.shape[1:]).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """(n, heads, len_q, dim) x (n, heads, len_k, dim) -> (n, heads, len_q, dim). 4-D is the
    layout PyTorch's fused CPU flash kernel takes (3-D falls back to the math path, which
    materializes len x len scores: ~6x slower at 4k tokens); softmax in fp32 for bf16 too."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _attend_key_block(q, k_base, v_base, k_stride_t, v_stride_t, n0, k_len, qk_scale, acc, m_i, l_i,
                      BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One key block of the online softmax -> the updated (acc, m_i, l_i). MASKED: the block
    may run past the sequence's keys (the tail); full blocks skip the masks."""
    cols = n0 + tl.arange(0, BLOCK_N)
    key_rows = cols.to(tl.int64)[:, None]  # token offsets in int64 (see the kernel)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        valid = cols < k_len
        k = tl.load(k_base + key_rows * k_stride_t + offs_d[None, :], mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + key_rows * k_stride_t + offs_d[None, :])
    if IEEE:  # fp32 inputs (tests): no TF32 rounding
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    # qk_scale folds in log2(e): exp2 is the native instruction.
    s = s * qk_scale
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a valid key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_base + key_rows * v_stride_t + offs_d[None, :], mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_base + key_rows * v_stride_t + offs_d[None, :])
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t, o_stride_h,
    qk_scale,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UNMASKED_MAIN: tl.constexpr = False,
):
    """FlashAttention forward for one (sequence x head, query block): scores never leave
    registers; the softmax is computed online over key blocks with fp32 statistics."""
    # (sequence, head) pairs on grid axis x (limit 2**31 - 1): a batch of many pairs would
    # overflow axis y's 65,535. Query blocks on y: at most 8192 / 16 = 512.
    seq_head, block_m = tl.program_id(0), tl.program_id(1)
    seq, head = seq_head // HEADS, seq_head % HEADS
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if block_m * BLOCK_M >= q_len:  # the grid covers max_seqlen_q; shorter sequences stop here
        return
    k_start = tl.load(cu_seqlens_k_ptr + seq)
    k_len = tl.load(cu_seqlens_k_ptr + seq + 1) - k_start

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # Token offsets in int64: total_tokens * 3 * hidden can pass 2**31.
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * q_stride_t + head * q_stride_h + offs_d[None, :],
                mask=(offs_m < q_len)[:, None], other=0.0)
    k_base = k_ptr + k_start.to(tl.int64) * k_stride_t + head * k_stride_h
    v_base = v_ptr + k_start.to(tl.int64) * v_stride_t + head * v_stride_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if UNMASKED_MAIN:  # full key blocks without masks, then at most one masked tail block
        full = k_len - k_len % BLOCK_N
        for n0 in range(0, full, BLOCK_N):
            acc, m_i, l_i = _attend_key_block(q, k_base, v_base, k_stride_t, v_stride_t, n0, k_len, qk_scale,
                                              acc, m_i, l_i, BLOCK_N, HEAD_DIM, False, IEEE)
        if full < k_len:
            acc, m_i, l_i = _attend_key_block(q, k_base, v_base, k_stride_t, v_stride_t, full, k_len, qk_scale,
                                              acc, m_i, l_i, BLOCK_N, HEAD_DIM, True, IEEE)
    else:
        for n0 in range(0, k_len, BLOCK_N):
            acc, m_i, l_i = _attend_key_block(q, k_base, v_base, k_stride_t, v_stride_t, n0, k_len, qk_scale,
                                              acc, m_i, l_i, BLOCK_N, HEAD_DIM, True, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no keys: zeros, not NaN
    tl.store(out_ptr + q_rows[:, None] * o_stride_t + head * o_stride_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(offs_m < q_len)[:, None])


# Query-block tiers: the longest query range of a batch picks BLOCK_M (each tier is one
# compiled variant, which the engine's warm-up visits): <= 16 rows, <= 64, longer.
QUERY_TIERS = (16, 64)


def attention_block_m(max_seqlen_q: int, head_dim: int) -> int:
    """Query rows per program. tl.dot needs 16; the last layer (one query per sequence)
    takes the smallest tile; head_dim > 64 stays at 64 rows (registers)."""
    if max_seqlen_q <= QUERY_TIERS[0]:
        return 16
    return 64 if max_seqlen_q <= QUERY_TIERS[1] or head_dim > 64 else 128


def attention_grid(max_seqlen_q: int, batch: int, heads: int, block_m: int) -> tuple[int, int]:
    """(batch x heads, query blocks of the longest sequence), within CUDA's grid limits."""
    return cuda_grid(batch * heads, -(-max_seqlen_q // block_m))


def attention_config(head_dim: int, block_m: int) -> dict:
    """The default launch configuration of a query tier: key blocks of 64 (32 above head_dim
    64, for registers), two stages, every key block masked."""
    return {"BLOCK_N": 64 if head_dim <= 64 else 32, "num_stages": 2, "num_warps": 4 if block_m <= 64 else 8,
            "UNMASKED_MAIN": False}


def attention_config_candidates(head_dim: int, block_m: int) -> dict[str, dict]:
    """Configurations a load-time measurement (rerank_kernels.tuning) may prefer to the
    default, by name: wider key blocks, deeper pipelining, the unmasked main loop."""
    widths = (64, 128) if head_dim <= 64 else (32, 64)
    warps = 4 if block_m <= 64 else 8
    found = {}
    for block_n in widths:
        for stages in (2, 3):
            found[f"n{block_n}-s{stages}-unmasked"] = {"BLOCK_N": block_n, "num_stages": stages, "num_warps": warps,
                                                       "UNMASKED_MAIN": True}
    return found


def _varlen_attention_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, configs):
    total_q, heads, head_dim = q.shape
    out = torch.empty_like(q)
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch == 0:
        return out
    BLOCK_M = attention_block_m(max_seqlen_q, head_dim)
    config = (configs or {}).get(BLOCK_M) or attention_config(head_dim, BLOCK_M)
    _varlen_attention_kernel[attention_grid(max_seqlen_q, batch, heads, BLOCK_M)](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * 1.4426950408889634,  # log2(e)
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, IEEE=q.dtype == torch.float32, **config,
    )
    return out


def varlen_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    configs: dict[int, dict] | None = None,
) -> torch.Tensor:
    """Triton FlashAttention-style forward, same contract as ``varlen_attention_torch``:
    q (total_q, heads, head_dim), k/v (total_k, heads, head_dim) (any token/head strides,
    e.g. views into a fused QKV), cu_seqlens_* (batch + 1,) int32 -> (total_q, heads, head_dim).
    head_dim must be a power of two >= 16. ``max_seqlen_k`` is unused (each program reads
    its own key length) and kept for the common signature. ``configs``: BLOCK_M tier ->
    launch configuration (see ``attention_config``), as measured at load; default per tier."""
    require_triton()
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"triton varlen attention needs a power-of-two head_dim >= 16, got {head_dim}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _varlen_attention_launch(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                                    max_seqlen_q, scale, configs)


# ----------------------------------------------------------------------------- dispatch
# The one place that knows which varlen attention runs where. Every backend takes the
# reference signature (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale).

# Preference order on CUDA; the CPU (and any other device) has only the reference.
ATTENTION_BACKENDS = ("flash-attn", "torch-varlen", "triton", "torch-sdpa")
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_attn_varlen_func():
    """flash_attn.flash_attn_varlen_func, or the reason it is unusable (a str)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as e:  # ImportError, or a build that does not match this torch (undefined symbol)
        return f"the flash-attn package does not import ({e.__class__.__name__}: {e})"
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_attn():
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10), or the reason it is unusable."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch >= 2.10)"
    if not torch.backends.cuda.is_flash_attention_available():
        return f"this torch build ({torch.__version__}) has no FlashAttention kernels"
    return varlen_attn


def varlen_attention_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """flash-attn's varlen forward (fp16/bf16, CUDA)."""
    return _flash_attn_varlen_func()(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     softmax_scale=scale, causal=False)


# FlashAttention's varlen kernels (flash-attn's and PyTorch's) put the batch on grid axis y:
# at most 65,535 sequences per call. The scheduler never forms a larger batch.
FLASH_MAX_BATCH = 65535


@functools.cache
def _takes_scale(fn: Callable) -> bool:
    return "scale" in inspect.signature(fn).parameters


def torch_varlen_arguments(fn: Callable, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           scale) -> tuple[tuple, dict]:
    """(args, kwargs) of a ``varlen_attn`` call that every torch >= 2.10 accepts. torch 2.10
    has no ``scale`` argument (``(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
    is_causal=False, return_aux=None)``) and applies 1/sqrt(head_dim); 2.11+ take ``scale=``.
    Without it, another scale is folded into the queries."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if _takes_scale(fn):
        return args, {"scale": scale}
    default = 1.0 / math.sqrt(q.shape[-1])
    if not math.isclose(scale, default, rel_tol=1e-6):
        args = (q * (scale / default), *args[1:])
    return args, {}


def varlen_attention_torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """PyTorch's own FlashAttention varlen forward (fp16/bf16, CUDA sm80+)."""
    fn = _torch_varlen_attn()
    args, kwargs = torch_varlen_arguments(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    return fn(*args, **kwargs)


_ATTENTION_FUNCTIONS = {
    "flash-attn": varlen_attention_flash_attn,
    "torch-varlen": varlen_attention_torch_varlen,
    "triton": varlen_attention_triton,
    "torch-sdpa": varlen_attention_torch,
}


def attention_unavailable_reason(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` with ``dtype`` (None: the model's
    CUDA dtype, fp16), or None when it can. Unknown names raise ValueError."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    device = torch.device(device)
    if name == "torch-sdpa":
        return None
    if device.type != "cuda":
        return f"it needs CUDA (device is {device.type}; the CPU has 'torch-sdpa')"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if name == "triton":
        return None if HAS_TRITON else "the triton package is not installed"
    if dtype is not None and dtype not in _HALF:
        return f"it runs fp16/bf16 only, not {dtype}"
    found = _flash_attn_varlen_func() if name == "flash-attn" else _torch_varlen_attn()
    if isinstance(found, str):
        return found
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:  # FlashAttention 2 kernels: Ampere and newer
        return f"its FlashAttention kernels need compute capability 8.0+, this GPU has {major}.{minor}"
    return None


def available_attention_backends(device: torch.device | str | None = None,
                                 dtype: torch.dtype | None = None) -> list[str]:
    """Backends that run on ``device`` (default: this machine's, CUDA when present) and ``dtype``, best first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in ATTENTION_BACKENDS if attention_unavailable_reason(name, device, dtype) is None]


def select_attention(device: torch.device | str, name: str | None = None,
                     dtype: torch.dtype | None = None) -> tuple[str, Callable]:
    """(backend name, function): ``name`` when given and usable (else ValueError saying why),
    otherwise the best available (CUDA: flash-attn > torch-varlen > triton; CPU: torch-sdpa)."""
    device = torch.device(device)
    if name is None:
        name = available_attention_backends(device, dtype)[0]
    else:
        reason = attention_unavailable_reason(name, device, dtype)
        if reason is not None:
            raise ValueError(f"attention backend {name!r} is unavailable on {device}: {reason}; "
                             f"available: {', '.join(available_attention_backends(device, dtype))}")
    return name, _ATTENTION_FUNCTIONS[name]
