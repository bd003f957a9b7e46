"""The ops the model calls, chosen once per (device, dtype, model shapes) by ``select_ops``
before the model is built: PyTorch references on the CPU with each GEMM's library chosen by
measurement (rerank_kernels.linear), fused Triton kernels and FlashAttention varlen on CUDA
with their load-time measurements (rerank_kernels.tuning)."""
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from rerank_kernels import attention_bf16, tuning
from rerank_kernels._triton import HAS_TRITON
from rerank_kernels.attention import (
    ATTENTION_BACKENDS,
    available_attention_backends,
    select_attention,
    varlen_attention_torch,
    varlen_attention_triton,
)
from rerank_kernels.causal_attention import causal_attention_torch, select_causal_attention
from rerank_kernels.embeddings import embed_layernorm_torch, embed_layernorm_triton
from rerank_kernels.gelu import bias_gelu_inplace, bias_gelu_torch, bias_gelu_triton
from rerank_kernels.layernorm import add_layernorm_inplace, add_layernorm_torch, add_layernorm_triton
from rerank_kernels.linear import FFN_UP, GemmShape, PlainLinear, choose_cpu_gemms, gemm_shapes
from rerank_kernels.linear_gelu import linear_gelu_unfused
from rerank_kernels.linear_int8 import int8_missing
from rerank_kernels.local_attention import local_attention_torch, select_local_attention
from rerank_kernels.rmsnorm import add_rmsnorm_torch, add_rmsnorm_triton
from rerank_kernels.rope import rope_torch, rope_triton
from rerank_kernels.rotary import norm_rope_torch, norm_rope_triton
from rerank_kernels.swiglu import swiglu_inplace, swiglu_torch, swiglu_triton

__all__ = ["ATTENTION_BACKENDS", "DTYPES", "ModelShapes", "Ops", "TORCH_OPS", "UnsupportedDtypeError",
           "activation_dtype", "available_attention_backends", "resolve_dtype", "select_ops", "triton_ops"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ops:
    embed_layernorm: Callable
    add_layernorm: Callable
    bias_gelu: Callable
    varlen_attention: Callable
    attention_backend: str
    # The FFN's up-projection where a load-time measurement (rerank_kernels.tuning, CUDA) found
    # something faster than the GEMM then bias_gelu, e.g. the fused Triton kernel; see linear_gelu.
    measured_linear_gelu: Callable | None = None
    # What load-time measurements chose, with their timings, by op (shown by /info).
    choices: dict = field(default_factory=dict, compare=False)
    # GEMM kind (rerank_kernels.linear) -> packer(weight, bias) -> linear(x), where measured (CPU).
    gemms: dict = field(default_factory=dict, compare=False)
    # Decoders (Qwen3): pre-norm RMSNorm with the residual, per-head q/k RMSNorm + RoPE, SwiGLU,
    # causal varlen attention with grouped-query heads.
    add_rmsnorm: Callable = add_rmsnorm_torch
    norm_rope: Callable = norm_rope_torch
    swiglu: Callable = swiglu_inplace
    causal_attention: Callable = causal_attention_torch
    # ModernBERT's local layers: varlen attention within a window, (q, k, v, cu_seqlens, max_seqlen, window, scale)
    local_attention: Callable = local_attention_torch
    rope: Callable = rope_torch  # rotary embeddings without a norm, in place (ModernBERT's q and k)

    def linear_gelu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (rows, in), weight (out, in), bias (out,) -> gelu_erf(x @ weight^T + bias) (rows, out):
        the measured choice, else the GEMM then this set's bias_gelu."""
        if self.measured_linear_gelu is not None:
            return self.measured_linear_gelu(x, weight, bias)
        return linear_gelu_unfused(x, weight, bias, self.bias_gelu)

    def pack(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Callable:
        """The GEMM for one weight (out, in) and bias (out,) of ``kind`` (rerank_kernels.linear):
        ``linear(x (rows, in)) -> (rows, out)``, which may hold the weight in its own layout."""
        if kind in self.gemms:
            return self.gemms[kind](weight, bias)
        return PlainLinear(weight, bias, self.linear_gelu if kind == FFN_UP else F.linear)

    def pack_gelu(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                  approximate: str = "none") -> Callable:
        """``linear(x) -> gelu(x @ weight^T + bias)`` for a kind measured with ``GemmShape.gelu``
        (ModernBERT's and DeBERTa-v2's kinds). PyTorch's elementwise erf GELU on the CPU is not
        batch-invariant (its vector and scalar erf differ in the last bit, and which elements take
        the scalar tail depends on the tensor's size), so a measured GEMM computes it per row in
        its epilogue; elsewhere (CUDA, the tanh form) the GELU follows the GEMM."""
        if approximate == "none" and kind in self.gemms:
            if bias is None:
                bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            return self.gemms[kind](weight, bias)
        linear = self.pack(kind, weight, bias)
        return lambda x: F.gelu(linear(x), approximate=approximate)


@dataclass(frozen=True)
class ModelShapes:
    """What the kernel choice depends on in a model: its sizes, and the FFN's row slice."""

    hidden: int
    intermediate: int
    heads: int
    ffn_rows: int = 4096
    # The GEMM kinds to measure on the CPU (default: the encoder's, rerank_kernels.linear.gemm_shapes).
    gemms: tuple[GemmShape, ...] | None = None


def int8_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """The int8 forward's attention on the CPU: bfloat16 dot products (attention_bf16) where the
    kernel takes the shapes, else PyTorch's float32 SDPA."""
    fn = varlen_attention_torch if attention_bf16.shape_problem(q, k, v) else attention_bf16.varlen_attention_bf16
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)


# The CPU path: the references, with the two glue ops writing into their (fresh) input.
TORCH_OPS = Ops(
    embed_layernorm=embed_layernorm_torch,
    add_layernorm=add_layernorm_inplace,
    bias_gelu=bias_gelu_inplace,
    varlen_attention=varlen_attention_torch,
    attention_backend="torch-sdpa",
)


def triton_ops(attention: Callable = varlen_attention_triton, attention_backend: str = "triton") -> Ops:
    """The CUDA op set: the Triton glue kernels with ``attention`` (default: the Triton kernel;
    under TRITON_INTERPRET=1 every op of it runs on CPU tensors, as the whole-model test does)."""
    return Ops(embed_layernorm_triton, add_layernorm_triton, bias_gelu_triton, attention, attention_backend,
               add_rmsnorm=add_rmsnorm_triton, norm_rope=norm_rope_triton, swiglu=swiglu_triton,
               causal_attention=select_causal_attention(attention_backend),
               local_attention=select_local_attention(attention_backend), rope=rope_triton)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def activation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the activations and of every weight but the GEMMs' for a --dtype: int8 runs
    only the layers' GEMMs in int8 (quantized at load and per row at each call); embeddings,
    LayerNorm, attention, softmax and the head stay float32, so int8 rounding is the one error added."""
    return torch.float32 if dtype == torch.int8 else dtype


class UnsupportedDtypeError(ValueError):
    """A --dtype the device cannot run (natively): the server exits 2 with this one line."""


def native_bf16_missing() -> str | None:
    """None when this CPU computes bfloat16 natively (AVX512_BF16 or AMX), else what it lacks.
    (torch.backends.mkldnn's own bf16 check is true on any AVX-512 CPU, where oneDNN emulates it.)"""
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return "this CPU has neither AVX512_BF16 nor AMX, so bfloat16 would be emulated (slower than float32)"


def resolve_dtype(device: torch.device | str, name: str = "auto") -> torch.dtype:
    """--dtype for a device: auto is float16 on CUDA, float32 on the CPU; CUDA takes float16,
    bfloat16 and float32; the CPU float32, bfloat16 where it is native and int8 where the CPU
    has int8 dot-product instructions (else UnsupportedDtypeError naming what is missing)."""
    device = torch.device(device)
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UnsupportedDtypeError(f"--dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    if device.type == "cpu" and name == "float16":
        raise UnsupportedDtypeError("--dtype float16 is not supported on the CPU (no native float16 GEMMs); "
                                    "use float32, or bfloat16 on a CPU with AVX512_BF16 or AMX")
    if name == "int8" and device.type != "cpu":
        raise UnsupportedDtypeError("--dtype int8 runs on the CPU only; use float16 or bfloat16 on CUDA")
    if name == "int8" and int8_missing():
        raise UnsupportedDtypeError(f"--dtype int8: {int8_missing()}; use --dtype float32")
    if device.type == "cpu" and name == "bfloat16" and native_bf16_missing():
        raise UnsupportedDtypeError(f"--dtype bfloat16: {native_bf16_missing()}; use --dtype float32")
    return DTYPES[name]


def select_ops(device: torch.device | str, attention: str | None = None, *, dtype: torch.dtype | None = None,
               shapes: ModelShapes | None = None, cpu_gemm: str = "auto", timer: Callable | None = None) -> Ops:
    """The single place that picks kernels, before the model is built.

    ``attention`` forces a backend by name (see ``ATTENTION_BACKENDS``); an unknown or
    unusable one raises ValueError. ``dtype`` (default: fp16 on CUDA, fp32 on the CPU) rules
    out the FlashAttention backends for fp32 models. With the model's ``shapes``, what has a
    choice is measured on random weights of those shapes: on the CPU each GEMM kind's library
    (``cpu_gemm``: auto, or pinned to onednn / torch), on CUDA the FFN's fused up-projection
    and the Triton attention's launch configurations. ``timer``: a stand-in for the measuring
    clock (tests). Without ``shapes`` nothing is measured: F.linear and the default kernels."""
    device = torch.device(device)
    dtype = dtype or resolve_dtype(device)
    name, attn = select_attention(device, attention, activation_dtype(dtype))
    if device.type != "cuda":
        if shapes is None:
            return TORCH_OPS
        kinds = list(shapes.gemms) if shapes.gemms else gemm_shapes(shapes.hidden, shapes.intermediate)
        gemms, report = choose_cpu_gemms(kinds, dtype,
                                         TORCH_OPS.bias_gelu, pinned=cpu_gemm,
                                         **({"timer": timer} if timer else {}))
        ops = replace(TORCH_OPS, gemms=gemms, choices={"cpu_gemm": report})
        if dtype == torch.int8 and attention is None and attention_bf16.missing() is None:
            # bf16 attention beside int8 GEMMs (rerank_kernels.attention_bf16); --attention torch-sdpa keeps fp32
            ops = replace(ops, varlen_attention=int8_attention, attention_backend="cpu-bf16")
        return ops
    if not HAS_TRITON:
        log.warning("triton is not installed: CUDA runs the PyTorch reference LayerNorm/GELU/embedding ops")
        return Ops(embed_layernorm_torch, add_layernorm_torch, bias_gelu_torch, attn, name, swiglu=swiglu_torch,
                   causal_attention=select_causal_attention(name), local_attention=select_local_attention(name))
    ops = triton_ops(attn, name)
    if shapes is None or shapes.gemms:  # a decoder: nothing of the encoder's to tune
        return ops
    return tuning.measure_cuda_ops(ops, shapes.hidden, shapes.intermediate, shapes.heads, dtype, device,
                                   max_rows=shapes.ffn_rows, timer=timer)
