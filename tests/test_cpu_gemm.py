"""CPU GEMMs chosen by measurement (rerank_kernels.linear) and the --dtype / --cpu-gemm
settings: oneDNN's rows against a float64 reference and against themselves in larger calls,
the choice (invariance first, then speed), the fallback where torch lacks the private ops,
pinning, memory after reordering, the dtype checks, and what the log and /info show."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT

import rerank_kernels
from rerank_kernels import TORCH_OPS, ModelShapes, UnsupportedDtypeError, linear, resolve_dtype, select_ops
from rerank_kernels.linear import FFN_DOWN, FFN_UP, OneDnnLinear, PlainLinear, choose_cpu_gemms, gemm_shapes
from rerank_kernels.linear_int8 import (
    IntMmLinear,
    OneDnnInt8Linear,
    dequantized_reference,
    int8_missing,
    quantize_rows,
    quantize_weight,
)
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.config import parse_args
from rerank_server.engine import Engine

NATIVE_BF16 = rerank_kernels.native_bf16_missing() is None
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not NATIVE_BF16, reason="this CPU has no native bfloat16"))]
INT8 = pytest.mark.skipif(int8_missing() is not None, reason=f"no int8 on this CPU: {int8_missing()}")
KINDS = 8  # QKV, first-token query, K/V, attention output, FFN up, FFN down, head dense, head out


def random_linear(out_features: int, in_features: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=g) * 0.02).to(dtype)
    return weight, torch.randn(out_features, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features,out_features,gelu", [(64, 48, False), (1280, 96, False), (96, 1500, True)])
def test_onednn_rows_match_the_reference_and_any_batch(dtype, in_features, out_features, gelu):
    """Reordered weights, fused exact GELU: within the dtype's rounding of a float64 reference,
    and every row bitwise equal whether computed alone (M=1: padded to two rows, the trap at
    K >= 1280), in a few rows or at any offset of a 300-row call."""
    weight, bias = random_linear(out_features, in_features, dtype)
    gemm = OneDnnLinear(weight, bias, gelu=gelu)
    x = torch.randn(300, in_features).to(dtype)
    want = F.linear(x.double(), weight.double(), bias.double())
    want = F.gelu(want) if gelu else want
    assert linear.accuracy_problem(gemm(x), want, dtype) is None
    full = gemm(x)
    for start, rows in [(0, 1), (1, 1), (299, 1), (0, 2), (10, 7), (3, 64), (0, 299)]:
        assert torch.equal(gemm(x[start:start + rows]), full[start:start + rows]), (start, rows)
    assert linear.invariance_problem(gemm, x) is None


def fake_candidates(monkeypatch, *, torch_varies_with_rows: bool):
    """The reference candidate replaced by an exact float64 GEMM, optionally made to depend
    on the row count as MKL's sgemm does at small M on AMD CPUs."""
    def linear_fn(x, weight, bias):
        y = F.linear(x.double(), weight.double(), bias.double())
        return (y * (1 + 1e-7 * x.shape[0] if torch_varies_with_rows else 1)).to(x.dtype)

    def packer(shape, bias_gelu):
        return lambda weight, bias: PlainLinear(weight, bias, linear_fn if not shape.gelu else
                                                lambda x, w, b: F.gelu(linear_fn(x, w, b)))
    monkeypatch.setattr(linear, "torch_packer", packer)


def timer_favouring(winner: str):
    """A timer that says ``winner``'s calls take 1 ms and the other's 2 ms."""
    def timer(fn) -> float:
        name = linear.ONEDNN if isinstance(fn.__defaults__[0], OneDnnLinear) else linear.TORCH
        return 1.0 if name == winner else 2.0
    return timer


def test_the_faster_invariant_candidate_is_chosen(monkeypatch):
    fake_candidates(monkeypatch, torch_varies_with_rows=False)
    shapes = gemm_shapes(32, 64)
    gemms, report = choose_cpu_gemms(shapes, torch.float32, TORCH_OPS.bias_gelu, timer=timer_favouring("torch"))
    assert {k: r["chosen"] for k, r in report["by_kind"].items()} == dict.fromkeys(report["by_kind"], "torch")
    assert len(report["by_kind"]) == KINDS and report["by_kind"][FFN_UP]["timings_ms"] == {"torch": 1.0, "onednn": 2.0}
    assert isinstance(gemms[FFN_DOWN](*random_linear(32, 64, torch.float32)), PlainLinear)
    _, report = choose_cpu_gemms(shapes, torch.float32, TORCH_OPS.bias_gelu, timer=timer_favouring("onednn"))
    assert {r["chosen"] for r in report["by_kind"].values()} == {"onednn"}
    json.dumps(report)  # /info serves it


def test_a_faster_candidate_that_depends_on_the_batch_is_not_chosen(monkeypatch):
    """Invariance first: however fast, a GEMM whose rows change with M is left out."""
    fake_candidates(monkeypatch, torch_varies_with_rows=True)
    gemms, report = choose_cpu_gemms(gemm_shapes(32, 64), torch.float32, TORCH_OPS.bias_gelu,
                                     timer=timer_favouring("torch"))
    for kind, entry in report["by_kind"].items():
        assert entry["chosen"] == "onednn" and "torch" not in entry["timings_ms"], kind
        assert "computed alone differ" in entry["not_chosen"]["torch"]
    assert isinstance(gemms[FFN_UP](*random_linear(64, 32, torch.float32)), OneDnnLinear)


def test_a_wrong_candidate_is_not_chosen(monkeypatch):
    def off_by_a_bit(shape):
        def pack(weight, bias):
            gemm = OneDnnLinear(weight, bias, gelu=shape.gelu)
            return lambda x: gemm(x) + 1e-2
        return pack
    monkeypatch.setattr(linear, "onednn_packer", off_by_a_bit)
    _, report = choose_cpu_gemms(gemm_shapes(32, 64)[:1], torch.float32, TORCH_OPS.bias_gelu,
                                 timer=lambda fn: 1.0)
    assert "from a float64 reference" in report["by_kind"]["qkv"]["not_chosen"]["onednn"]
    assert report["by_kind"]["qkv"]["chosen"] == "torch"


def test_without_the_private_ops_f_linear_is_used_with_one_log_line(monkeypatch, caplog):
    """An older torch without torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise:
    F.linear everywhere, one warning; pinning onednn is refused with the reason."""
    monkeypatch.setattr(linear, "MKLDNN", SimpleNamespace())
    with caplog.at_level(logging.INFO, logger="rerank_kernels.linear"):
        ops = select_ops("cpu", dtype=torch.float32, shapes=ModelShapes(32, 64, 2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lacks torch.ops.mkldnn._reorder_linear_weight and _linear_pointwise" in warnings[0]
    assert {r["chosen"] for r in ops.choices["cpu_gemm"]["by_kind"].values()} == {"torch"}
    weight, bias = random_linear(64, 32, torch.float32)
    x = torch.randn(5, 32)
    assert torch.allclose(ops.pack(FFN_UP, weight, bias)(x), F.gelu(F.linear(x, weight, bias)), atol=1e-6)
    with pytest.raises(ValueError, match="--cpu-gemm onednn: torch .* lacks"):
        select_ops("cpu", dtype=torch.float32, shapes=ModelShapes(32, 64, 2), cpu_gemm="onednn")


@pytest.mark.parametrize("pinned", ["torch", "onednn"])
def test_a_pinned_choice_is_not_measured(pinned):
    def timer(fn):
        raise AssertionError("pinned: nothing is timed")
    ops = select_ops("cpu", dtype=torch.float32, shapes=ModelShapes(32, 64, 2), cpu_gemm=pinned, timer=timer)
    report = ops.choices["cpu_gemm"]
    assert report["reason"] == f"pinned by --cpu-gemm {pinned}"
    assert {r["chosen"] for r in report["by_kind"].values()} == {pinned} and len(report["by_kind"]) == KINDS
    packed = ops.pack(FFN_DOWN, *random_linear(32, 64, torch.float32))
    assert isinstance(packed, OneDnnLinear if pinned == "onednn" else PlainLinear)


def test_select_ops_measures_every_gemm_kind_on_this_cpu():
    """The real measurement, at small shapes: every kind timed or refused with a reason, and
    what is chosen computes the same GEMM as F.linear."""
    ops = select_ops("cpu", dtype=torch.float32, shapes=ModelShapes(64, 160, 2))
    report = ops.choices["cpu_gemm"]
    assert len(report["by_kind"]) == KINDS and report["threads"] == torch.get_num_threads()
    for kind, entry in report["by_kind"].items():
        assert entry["timings_ms"] and entry["chosen"] in entry["timings_ms"], (kind, entry)
        assert all(ms > 0 for ms in entry["timings_ms"].values())
    weight, bias = random_linear(64, 160, torch.float32)
    x = torch.randn(9, 160)
    assert torch.allclose(ops.pack(FFN_DOWN, weight, bias)(x), F.linear(x, weight, bias), atol=1e-5)


# ----------------------------------------------------------------------------- dtype

def test_dtype_auto_and_cuda_choices():
    assert resolve_dtype("cpu") == torch.float32 and resolve_dtype("cuda") == torch.float16
    assert [resolve_dtype("cuda", n) for n in ("float16", "bfloat16", "float32")] == [
        torch.float16, torch.bfloat16, torch.float32]
    with pytest.raises(UnsupportedDtypeError, match="float16 is not supported on the CPU"):
        resolve_dtype("cpu", "float16")


def test_bfloat16_needs_native_support(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(UnsupportedDtypeError, match="neither AVX512_BF16 nor AMX"):
        resolve_dtype("cpu", "bfloat16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_dtype("cpu", "bfloat16") == torch.bfloat16


def test_flags_and_environment(monkeypatch):
    config = parse_args([])
    assert (config.dtype, config.cpu_gemm) == ("auto", "auto")
    monkeypatch.setenv("RERANK_DTYPE", "bfloat16")
    monkeypatch.setenv("RERANK_CPU_GEMM", "onednn")
    assert (parse_args([]).dtype, parse_args([]).cpu_gemm) == ("bfloat16", "onednn")
    assert parse_args(["--dtype", "float32", "--cpu-gemm", "torch"]).cpu_gemm == "torch"
    assert parse_args(["--dtype", "int8"]).dtype == "int8"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--dtype", "float64"])
    assert exit_info.value.code == 2


def test_float16_on_the_cpu_exits_2_with_one_line(tiny_checkpoint):
    result = subprocess.run([sys.executable, "-m", "rerank_server", "--model", str(tiny_checkpoint),
                             "--device", "cpu", "--dtype", "float16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "float16 is not supported on the CPU" in lines[0]


def test_bfloat16_without_native_support_exits_2_naming_what_is_missing(tiny_checkpoint):
    result = subprocess.run(
        [sys.executable, "-c", "import sys, torch\n"
         "torch.cpu._is_avx512_bf16_supported = lambda: False\n"
         "torch.cpu._is_amx_tile_supported = lambda: False\n"
         "from rerank_server.__main__ import main\nmain(sys.argv[1:])",
         "--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "bfloat16"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "neither AVX512_BF16 nor AMX" in lines[0]


# ----------------------------------------------------------------------------- int8

def test_row_quantization_is_per_row_and_symmetric():
    """A row's int8 values and scale are its own: the same with any other rows beside it (a
    per-tensor scale would change with the batch's largest value), zero rows stay zero, and
    the uint8 form oneDNN takes is the same values + 128 (but for a rounding at an exact tie)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 96, generator=g)
    x[7] = 0
    x[11] *= 1000  # a large row must not change the others
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and (q.abs().amax(1)[torch.arange(40) != 7] == 127).all()
    assert (q[7] == 0).all() and torch.isfinite(scale).all()
    for start, rows in [(0, 1), (11, 1), (3, 5), (12, 28)]:
        q_part, scale_part = quantize_rows(x[start:start + rows])
        assert torch.equal(q_part, q[start:start + rows]) and torch.equal(scale_part, scale[start:start + rows])
    assert ((x - q * scale[:, None]).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    offset, offset_scale = quantize_rows(x, offset=True)
    assert offset.dtype == torch.uint8 and torch.equal(offset_scale, scale)
    assert (offset.int() - 128 - q.int()).abs().max() <= 1
    w = torch.randn(48, 96, generator=g)
    qw, sw = quantize_weight(w)
    assert qw.dtype == torch.int8 and (qw.abs().amax(1) == 127).all()
    assert ((w - qw * sw[:, None]).abs() <= sw[:, None] / 2 * (1 + 1e-5)).all()


@INT8
@pytest.mark.parametrize("module", [OneDnnInt8Linear, IntMmLinear])
@pytest.mark.parametrize("in_features,out_features,gelu", [(64, 48, False), (1280, 96, False), (96, 1500, True)])
def test_int8_rows_match_the_quantized_reference_and_any_batch(module, in_features, out_features, gelu):
    """Both int8 candidates compute the float64 GEMM of the quantized operands (then bias and
    exact GELU) to float32 rounding (oneDNN up to a tie rounded the other way), and every row
    is bitwise equal alone, in a few rows or at any offset of a 300-row call."""
    weight, bias = random_linear(out_features, in_features, torch.float32)
    gemm = module(weight, bias, gelu)
    x = torch.randn(300, in_features)
    assert linear.accuracy_problem(gemm(x), dequantized_reference(x, weight, bias, gelu), torch.int8) is None
    want = F.linear(x.double(), weight.double(), bias.double())
    want = F.gelu(want) if gelu else want
    assert (gemm(x).double() - want).abs().max() < 0.1  # int8 rounding, no more
    full = gemm(x)
    for start, rows in [(0, 1), (1, 1), (299, 1), (0, 2), (10, 7), (3, 64), (0, 299)]:
        assert torch.equal(gemm(x[start:start + rows]), full[start:start + rows]), (start, rows)
    assert linear.invariance_problem(gemm, x) is None


@INT8
def test_select_ops_int8_measures_both_int8_gemms_and_keeps_the_head_fp32():
    ops = select_ops("cpu", dtype=torch.int8, shapes=ModelShapes(64, 160, 2))
    by_kind = ops.choices["cpu_gemm"]["by_kind"]
    assert len(by_kind) == KINDS
    for kind, entry in by_kind.items():
        assert entry["timings_ms"] and entry["chosen"] in entry["timings_ms"], (kind, entry)
        assert entry["shape"].endswith("float32" if kind.startswith("head") else "int8"), entry
    weight, bias = random_linear(64, 160, torch.float32)
    x = torch.randn(9, 160)
    down = ops.pack(FFN_DOWN, weight, bias)
    assert isinstance(down, OneDnnInt8Linear | IntMmLinear)
    assert linear.accuracy_problem(down(x), dequantized_reference(x, weight, bias), torch.int8) is None


@INT8
@pytest.mark.parametrize("pinned,module", [("torch", IntMmLinear), ("onednn", OneDnnInt8Linear)])
def test_int8_pinned(pinned, module):
    ops = select_ops("cpu", dtype=torch.int8, shapes=ModelShapes(32, 64, 2), cpu_gemm=pinned,
                     timer=lambda fn: pytest.fail("pinned: nothing is timed"))
    assert isinstance(ops.pack(FFN_UP, *random_linear(64, 32, torch.float32)), module)


def test_int8_needs_int8_dot_products_and_the_cpu(monkeypatch):
    with pytest.raises(UnsupportedDtypeError, match="int8 runs on the CPU only"):
        resolve_dtype("cuda", "int8")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(UnsupportedDtypeError, match="neither AVX512_VNNI nor AMX"):
        resolve_dtype("cpu", "int8")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)
    assert resolve_dtype("cpu", "int8") == torch.int8


def test_int8_without_dot_products_exits_2_naming_what_is_missing(tiny_checkpoint):
    result = subprocess.run(
        [sys.executable, "-c", "import sys, torch\n"
         "torch.cpu._is_vnni_supported = lambda: False\n"
         "torch.cpu._is_amx_tile_supported = lambda: False\n"
         "from rerank_server.__main__ import main\nmain(sys.argv[1:])",
         "--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "int8"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "neither AVX512_VNNI nor AMX" in lines[0]


# ----------------------------------------------------------------------------- the engine

@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.skipif(
    not NATIVE_BF16, reason="this CPU has no native bfloat16")), pytest.param("int8", marks=INT8)])
def test_the_log_and_info_show_dtype_and_choices(tiny_checkpoint, caplog, tmp_path, dtype):
    from rerank_server.service import RerankService
    with caplog.at_level(logging.INFO):
        engine = Engine.load(str(tiny_checkpoint), "cpu", dtype=dtype)
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(loaded) == 1 and f"{dtype} on cpu" in loaded[0] and "kernels: cpu_gemm: qkv " in loaded[0]
    assert any("CPU GEMMs measured in" in r.getMessage() for r in caplog.records)
    service = RerankService(["m"], max_documents=10)
    service.engine = engine
    info = json.loads(json.dumps(service.describe()))
    assert info["dtype"] == dtype
    by_kind = info["kernel_choices"]["cpu_gemm"]["by_kind"]
    assert len(by_kind) == KINDS and all(entry["timings_ms"] for entry in by_kind.values())
    assert info["kernel_choices"]["cpu_gemm"]["measured_in_s"] > 0


_RSS_CHILD = """
import json, re, sys
from pathlib import Path
import psutil, torch
import rerank_kernels
from rerank_server.models.encoder import EncoderConfig, load_cross_encoder
path = Path(sys.argv[1])
c = EncoderConfig.from_hf(json.loads((path / "config.json").read_text()))
ops = rerank_kernels.select_ops("cpu", dtype=torch.float32, cpu_gemm=sys.argv[2],
                                shapes=rerank_kernels.ModelShapes(c.hidden_size, c.intermediate_size, c.num_heads))
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the RSS now
before = psutil.Process().memory_info().rss
model = load_cross_encoder(path, ops, torch.device("cpu"), torch.float32)
# VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak over fork + exec)
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
weights = model.num_parameters * 4
kinds = {type(model.layers[0].up).__name__, type(model.head_out).__name__}
print(json.dumps({"growth": peak - before, "weights": weights, "kinds": sorted(kinds)}))
"""


@pytest.fixture(scope="module")
def layer_heavy_checkpoint(tmp_path_factory):
    """8 layers x 768, FFN 3072, a 1000-piece vocabulary: 98% of the 230 MB are GEMM weights,
    so keeping the plain weights beside the reordered ones would double the memory. (oneDNN's
    first reorder adds a fixed ~10 MB: negligible beside a real model, not beside a tiny one.)"""
    return write_random_checkpoint(tmp_path_factory.mktemp("layers"), "small", seed=5, vocab_size=1000,
                                   max_position_embeddings=514, hidden_size=768, intermediate_size=3072,
                                   num_attention_heads=12, num_hidden_layers=8)


@pytest.mark.parametrize("pinned", ["onednn", "torch"])
def test_peak_memory_while_packing_stays_within_1_3x_the_weights(layer_heavy_checkpoint, pinned):
    """Reordered weights replace the plain ones layer by layer: the process's peak RSS grows by
    at most 1.3x the weights' bytes over its RSS before loading."""
    result = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(layer_heavy_checkpoint), pinned], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["kinds"] == (["OneDnnLinear"] if pinned == "onednn" else ["PlainLinear"])
    assert measured["growth"] <= 1.3 * measured["weights"], measured
    print(f"peak RSS growth {measured['growth'] / measured['weights']:.2f}x the weights ({pinned})")
