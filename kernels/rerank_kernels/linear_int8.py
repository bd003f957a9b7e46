"""int8 GEMMs on the CPU (--dtype int8): weights quantized once at load per output channel,
activations per row at every call, both symmetric (zero point 0, values in [-127, 127]).

Per-row activation scales keep batch invariance: a row's scale is its own absolute maximum,
so its int8 values, the exact int32 accumulation and the float epilogue are the same whatever
else shares the call. (A per-tensor scale, as onnxruntime's ``quantize_dynamic`` and
``torch.ao``'s dynamic linear use, would make each row depend on the largest activation of
the whole batch.) Neither candidate library takes a per-row activation scale, so each runs
with an activation scale of 1 and the row scale is applied in the epilogue, which also adds
the bias (and the exact GELU for the FFN's up-projection):

- ``OneDnnInt8Linear``: oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise``,
  weight prepacked once by ``qlinear_prepack``); its output is already in fp32 with the
  weight's per-channel scale applied.
- ``IntMmLinear``: ``torch._int_mm`` (int8 x int8 -> int32), both scales in the epilogue.

Shapes: weight (out, in), bias (out,), x (rows, in) float32 -> (rows, out) float32.
"""
from __future__ import annotations

import warnings

import torch

from rerank_kernels import int8_rows
from rerank_kernels.int8_rows import QuantizedRows
from rerank_kernels.layernorm import add_layernorm_inplace

INT8_MAX = 127
# oneDNN's int8 GEMMs on VNNI multiply unsigned by signed bytes: signed activations take a slow
# reference path (~1,000x slower here), so they are passed as uint8 with zero point 128.
ACTIVATION_OFFSET = 128
ONEDNN_OPS = torch.ops.onednn  # a module attribute, so that a test can take the private ops away


def int8_missing() -> str | None:
    """None when this CPU has int8 dot-product instructions (AVX512_VNNI or AMX), else what it lacks.
    (Without them int8 GEMMs run on 16-bit multiply-adds, no faster than bfloat16 or float32.)"""
    if torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return "this CPU has neither AVX512_VNNI nor AMX (no int8 dot-product instructions)"


def onednn_int8_missing() -> str | None:
    """None when torch has oneDNN's quantized linear ops, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    missing = [op for op in ("qlinear_prepack", "qlinear_pointwise") if not hasattr(ONEDNN_OPS, op)]
    return f"torch {torch.__version__} lacks torch.ops.onednn.{' and '.join(missing)}" if missing else None


def quantize_rows(x: torch.Tensor, offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, cols) float -> (int8 q (rows, cols), float32 scale (rows,)) with x ~= q * scale[:, None]:
    each row's scale is its absolute maximum / 127; q = round(x * (1 / scale)), ties to even.
    ``offset``: uint8 q + 128 instead (the same values with zero point 128, which oneDNN's fast
    kernels take)."""
    x = x.float()
    # amax and amin are two vectorized passes; torch.aminmax over a dim is ~100x slower here
    amax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_())
    # an all-zero row keeps a tiny scale (its values stay 0) instead of dividing by zero
    scale = amax.div_(INT8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)
    scaled = x * scale.reciprocal()[:, None]
    if not hasattr(torch, "quantize_per_tensor"):  # deprecated in torch 2.13: the same in three passes
        q = scaled.round_().clamp_(-INT8_MAX, INT8_MAX)
        return (q.add_(ACTIVATION_OFFSET).to(torch.uint8) if offset else q.to(torch.int8)), scale
    # quantize_per_tensor with scale 1 rounds and saturates in one vectorized pass (per-channel
    # quantization, which would take the row scales itself, is a scalar loop: ~20x slower)
    q = torch.quantize_per_tensor(scaled, 1.0, ACTIVATION_OFFSET if offset else 0,
                                  torch.quint8 if offset else torch.qint8)
    return _raw_bytes(q, torch.uint8 if offset else torch.int8), scale


def _int_repr_view(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized tensor's bytes as a plain ``dtype`` tensor without a copy (``int_repr`` copies)."""
    return torch.empty(0, dtype=dtype).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def _int_repr_copy(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.int_repr()


# torch warns once per process that quantized tensors are deprecated: once here, silenced (the
# quantized tensor is only a vectorized rounding step; its int8 values are what is used). The
# same call checks that the copy-free view reads the values int_repr gives (else int_repr is used).
_raw_bytes = _int_repr_copy
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    if hasattr(torch, "quantize_per_tensor"):
        _probe = torch.quantize_per_tensor(torch.tensor([[-3.0, 0.0, 5.0]]), 1.0, ACTIVATION_OFFSET, torch.quint8)
        try:
            if torch.equal(_int_repr_view(_probe, torch.uint8), _probe.int_repr()):
                _raw_bytes = _int_repr_view
        except RuntimeError:
            pass
        del _probe


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (int8 (out, in), float32 scale (out,)): symmetric, per output channel."""
    w = weight.float()
    scale = w.abs().amax(dim=1).div_(INT8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantized_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          gelu: bool = False) -> torch.Tensor:
    """What an int8 GEMM of this module should compute, in float64: the GEMM of the quantized
    operands (per-row x, per-channel weight), then bias and exact GELU. (rows, out) float64."""
    qx, sx = quantize_rows(x)
    qw, sw = quantize_weight(weight)
    y = (qx.double() @ qw.double().T) * sx.double()[:, None] * sw.double()
    y = y if bias is None else y + bias.double()
    return torch.nn.functional.gelu(y) if gelu else y


def _epilogue(y: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """The torch epilogue: y (rows, out) float32, written over: y * row_scale[:, None] + bias in
    one pass, then the exact erf GELU in place when ``gelu``."""
    if bias is None:
        y.mul_(row_scale[:, None])
    else:
        torch.addcmul(bias, y, row_scale[:, None], out=y)
    return torch.ops.aten.gelu_(y, approximate="none") if gelu else y


def _as_quantized(x: torch.Tensor | QuantizedRows, offset: bool) -> QuantizedRows:
    """The GEMM's input quantized per row, as int8 or as uint8 + 128 (``offset``): from float32
    rows, or from rows a previous GEMM's epilogue already quantized (the other encoding is one
    bytewise XOR: v + 128 and v share their low 7 bits, the sign bit flips)."""
    if isinstance(x, QuantizedRows):
        if x.offset == offset:
            return x
        return QuantizedRows(x.q.view(torch.uint8).bitwise_xor(ACTIVATION_OFFSET)
                             .view(torch.uint8 if offset else torch.int8), x.scale, offset)
    if int8_rows.missing():
        return QuantizedRows(*quantize_rows(x, offset=offset), offset)
    return int8_rows.quantize_rows(x.float(), offset=offset)


class Int8Linear:
    """What both candidates share: the weight quantized per output channel at load; per call the
    input quantized per row (``input_offset``: the encoding the GEMM takes), the GEMM (``sums``),
    then the epilogue (row scale, bias, GELU). With the C glue (rerank_kernels.int8_rows) the
    epilogue is one pass, ``quantized`` hands the next int8 GEMM its input already quantized and
    ``add_layernorm`` ends the GEMM with the residual and the LayerNorm in that same pass."""

    input_offset = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False):
        qw, self.weight_scale = quantize_weight(weight)
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.float().contiguous()
        self.gelu = gelu
        self.prepare(qw)

    def sums(self, x: QuantizedRows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The GEMM: (int32 sums, the weight's scale) or (float32 sums with the weight's scale, None)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        return self._run(_as_quantized(x, self.input_offset), None)

    def quantized(self, x: torch.Tensor | QuantizedRows, offset: bool) -> QuantizedRows:
        """The output quantized per row for the next int8 GEMM (int8, or uint8 + 128 with ``offset``)."""
        if int8_rows.missing():
            return _as_quantized(self(x), offset)
        return self._run(_as_quantized(x, self.input_offset), offset)

    def add_layernorm(self, x: torch.Tensor | QuantizedRows, residual: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """LayerNorm(self(x) + residual) (rows, out_features) float32, into ``out`` when given (it may
        be ``residual``): with the C glue in the GEMM's epilogue, else as Ops.add_layernorm does."""
        if int8_rows.missing() or self.gelu:
            return add_layernorm_inplace(self(x), residual, weight, bias, eps, out)
        q = _as_quantized(x, self.input_offset)
        sums, col_scale = self.sums(q)
        return int8_rows.epilogue_layernorm(sums, q.scale, col_scale, self.bias, residual, weight, bias, eps, out)[0]

    def _run(self, x: QuantizedRows, quantize: bool | None) -> torch.Tensor | QuantizedRows:
        sums, col_scale = self.sums(x)
        if int8_rows.missing():
            # int32 -> float32, then the weight's scale in place: a multiply that promotes int32 to
            # float goes through a casting loop, ~1.5x the time of the two vectorized passes
            y = sums if col_scale is None else sums.float().mul_(col_scale)
            return _epilogue(y, x.scale, self.bias, self.gelu)
        return int8_rows.epilogue(sums, x.scale, col_scale, self.bias, self.gelu, quantize)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.out_features}, {'gelu' if self.gelu else 'none'})"


class OneDnnInt8Linear(Int8Linear):
    """oneDNN's int8 linear on a weight quantized and prepacked once; uint8 + 128 activations."""

    input_offset = True

    def prepare(self, qw: torch.Tensor) -> None:
        self.weight = ONEDNN_OPS.qlinear_prepack(qw, None)
        self.weight_zero_points = torch.zeros(self.out_features, dtype=torch.int64)

    def sums(self, x: QuantizedRows) -> tuple[torch.Tensor, None]:
        # activation scale 1, zero point 128: the int32 sums times the weight's scale, in fp32
        return ONEDNN_OPS.qlinear_pointwise(x.q, 1.0, ACTIVATION_OFFSET, self.weight, self.weight_scale,
                                            self.weight_zero_points, None, 1.0, 0, torch.float32, "none", [],
                                            ""), None


class IntMmLinear(Int8Linear):
    """``torch._int_mm`` (int32 sums) on a weight quantized once, both scales in the epilogue."""

    def prepare(self, qw: torch.Tensor) -> None:
        self.weight_t = qw.t()  # (in, out), column-major: the layout _int_mm reads fastest

    def sums(self, x: QuantizedRows) -> tuple[torch.Tensor, torch.Tensor]:
        return torch._int_mm(x.q, self.weight_t), self.weight_scale
