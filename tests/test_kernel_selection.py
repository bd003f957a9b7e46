"""Load-time kernel selection (rerank_kernels.tuning) on the CPU with a fake timer: which
path wins per row tier, ties, what is logged and reported, a failing or wrong candidate
falling back to the baseline. The candidates are CPU functions standing in for the GPU's."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch

from rerank_kernels import TORCH_OPS, Ops, attention, tuning
from rerank_kernels.linear import FFN_UP
from rerank_kernels.linear_gelu import linear_gelu_torch

HIDDEN, INTERMEDIATE = 32, 48
TIERS = ["rows<=64", "rows<=512", "rows>512"]


class FakeGpu:
    """Candidates that record their calls, and a timer that returns the time configured for
    the (candidate, rows) it was asked to time (it runs the call once to find out)."""

    def __init__(self, times: dict[tuple[str, int], float], fused_error: Exception | None = None,
                 fused_offset: float = 0.0, baseline_error: Exception | None = None):
        self.times, self.fused_error, self.fused_offset = times, fused_error, fused_offset
        self.baseline_error = baseline_error
        self.calls: list[tuple[str, int]] = []
        self.timed: list[tuple[str, int]] = []

    def baseline(self, x, weight, bias):
        self.calls.append(("baseline", x.shape[0]))
        if self.baseline_error is not None:
            raise self.baseline_error
        return TORCH_OPS.linear_gelu(x, weight, bias)

    def fused(self, x, weight, bias):
        self.calls.append(("fused", x.shape[0]))
        if self.fused_error is not None:
            raise self.fused_error
        return linear_gelu_torch(x, weight, bias) + self.fused_offset

    def timer(self, fn) -> float:
        before = len(self.calls)
        fn()
        assert len(self.calls) == before + 1, "the timed call must run exactly one candidate"
        self.timed.append(self.calls[-1])
        return self.times[self.calls[-1]]


def weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(INTERMEDIATE, HIDDEN, generator=g) / HIDDEN ** 0.5, torch.randn(INTERMEDIATE, generator=g)


def choose(gpu: FakeGpu, max_rows: int = 1024) -> Ops:
    ops = replace(TORCH_OPS, measured_linear_gelu=gpu.baseline)  # the baseline: ops.linear_gelu
    return tuning.choose_ffn_up(ops, *weights(), max_rows=max_rows, timer=gpu.timer, fused=gpu.fused)


def times(baseline: tuple[float, float, float], fused: tuple[float, float, float], rows=(64, 512, 1024)):
    return {**{("baseline", r): t for r, t in zip(rows, baseline, strict=True)},
            **{("fused", r): t for r, t in zip(rows, fused, strict=True)}}


def test_fused_wins_every_tier(caplog):
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.05, 0.30, 0.70)))
    with caplog.at_level(logging.INFO, logger="rerank_kernels.tuning"):
        ops = choose(gpu)
    assert ops.measured_linear_gelu == gpu.fused  # one op for every tier: no per-call dispatch
    # each tier timed at its largest row count, baseline first, both candidates
    assert gpu.timed == [("baseline", 64), ("fused", 64), ("baseline", 512), ("fused", 512),
                         ("baseline", 1024), ("fused", 1024)]
    report = ops.choices[tuning.FFN_UP]
    assert list(report) == TIERS
    assert report["rows>512"] == {"rows_timed": 1024, "chosen": "triton-fused", "baseline": "cublas+bias_gelu",
                                  "timings_ms": {"cublas+bias_gelu": 1.0, "triton-fused": 0.7}}
    assert [report[t]["timings_ms"]["triton-fused"] for t in TIERS] == [0.05, 0.30, 0.70]
    json.dumps(ops.choices)  # /info serves it as JSON
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4
    assert logged[2] == ("FFN up-projection + GELU at 1024 x 32 -> 48: triton-fused chosen "
                         "(cublas+bias_gelu 1.0000 ms, triton-fused 0.7000 ms)")
    assert logged[3].startswith("FFN up-projection measured in ")
    assert logged[3].endswith("s: rows<=64 triton-fused, rows<=512 triton-fused, rows>512 triton-fused")


def test_baseline_wins_every_tier_keeps_todays_path():
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.20, 0.60, 1.50)))
    ops = choose(gpu)
    assert ops.measured_linear_gelu == gpu.baseline
    assert {t: r["chosen"] for t, r in ops.choices[tuning.FFN_UP].items()} == dict.fromkeys(TIERS, "cublas+bias_gelu")


def test_a_tie_keeps_the_baseline():
    """Within TIE_MARGIN (3%) the measurement is noise: the known path stays."""
    gpu = FakeGpu(times(baseline=(1.00, 1.00, 1.00), fused=(0.98, 1.00, 0.96)))
    report = choose(gpu).choices[tuning.FFN_UP]
    assert [report[t]["chosen"] for t in TIERS] == ["cublas+bias_gelu", "cublas+bias_gelu", "triton-fused"]


def test_mixed_choice_dispatches_by_rows():
    """Baseline for few rows, fused for the full slices: each call goes to its tier's winner."""
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.30, 0.40, 0.50)))
    ops = choose(gpu)
    assert isinstance(ops.measured_linear_gelu, tuning.ByRows)
    assert repr(ops.measured_linear_gelu) == ("ByRows(<=64: cublas+bias_gelu, <=512: triton-fused, "
                                              "more: triton-fused)")
    weight, bias = weights()
    gpu.calls.clear()
    for rows in (1, 64, 65, 512, 513, 4096):
        out = ops.linear_gelu(torch.randn(rows, HIDDEN), weight, bias)
        assert out.shape == (rows, INTERMEDIATE)
    assert gpu.calls == [("baseline", 1), ("baseline", 64), ("fused", 65), ("fused", 512), ("fused", 513),
                         ("fused", 4096)]


def test_failing_candidate_falls_back_with_a_log_line(caplog):
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.01, 0.01, 0.01)),
                  fused_error=RuntimeError("out of resources: shared memory"))
    with caplog.at_level(logging.INFO, logger="rerank_kernels.tuning"):
        ops = choose(gpu)
    assert ops.measured_linear_gelu == gpu.baseline
    report = ops.choices[tuning.FFN_UP]
    for tier in TIERS:
        assert report[tier]["chosen"] == "cublas+bias_gelu"
        assert report[tier]["failed"] == {"triton-fused": "RuntimeError: out of resources: shared memory"}
        assert list(report[tier]["timings_ms"]) == ["cublas+bias_gelu"]  # a failed candidate is not timed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert warnings[0] == ("FFN up-projection + GELU at 64 x 32 -> 48: candidate triton-fused is not used, "
                           "it failed at load: RuntimeError: out of resources: shared memory")


def test_wrong_candidate_falls_back():
    """A kernel that runs but disagrees with the baseline (a miscompile on an untested GPU)
    is never chosen, however fast."""
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.01, 0.01, 0.01)), fused_offset=0.5)
    ops = choose(gpu)
    assert ops.measured_linear_gelu == gpu.baseline
    failed = ops.choices[tuning.FFN_UP]["rows>512"]["failed"]["triton-fused"]
    assert failed.startswith("max abs diff 0.5 from the baseline"), failed


def test_nan_candidate_falls_back():
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.01, 0.01, 0.01)), fused_offset=float("nan"))
    assert choose(gpu).choices[tuning.FFN_UP]["rows<=64"]["failed"] == {"triton-fused": "non-finite values"}


def test_a_failing_baseline_is_an_error():
    """The baseline is today's path: if it cannot run, loading must fail loudly."""
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.05, 0.30, 0.70)),
                  baseline_error=RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"))
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_ALLOC_FAILED"):
        choose(gpu)


def test_small_slices_have_fewer_tiers():
    """With FFN slices of at most 300 rows there is nothing above 512 to time."""
    gpu = FakeGpu(times(baseline=(0.10, 0.50), fused=(0.05, 0.30), rows=(64, 300)))
    ops = choose(gpu, max_rows=300)
    assert list(ops.choices[tuning.FFN_UP]) == ["rows<=64", "rows>64"]
    assert ops.choices[tuning.FFN_UP]["rows>64"]["rows_timed"] == 300


def test_slices_below_the_first_tier_are_one_tier():
    gpu = FakeGpu({("baseline", 40): 1.0, ("fused", 40): 0.5})
    ops = choose(gpu, max_rows=40)
    assert list(ops.choices[tuning.FFN_UP]) == ["all rows"] and ops.measured_linear_gelu == gpu.fused


def test_other_choices_are_kept():
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.05, 0.30, 0.70)))
    ops = replace(TORCH_OPS, measured_linear_gelu=gpu.baseline, choices={"attention": {"chosen": "x"}})
    ops = tuning.choose_ffn_up(ops, *weights(), max_rows=1024, timer=gpu.timer, fused=gpu.fused)
    assert list(ops.choices) == ["attention", tuning.FFN_UP]


def test_cpu_ops_without_shapes_measure_nothing():
    """Without the model's shapes the CPU set measures nothing: no choices, F.linear, the reference."""
    assert TORCH_OPS.choices == {} and TORCH_OPS.measured_linear_gelu is None and TORCH_OPS.gemms == {}
    x, (weight, bias) = torch.randn(5, HIDDEN), weights()
    assert torch.allclose(TORCH_OPS.pack(FFN_UP, weight, bias)(x), linear_gelu_torch(x, weight, bias), atol=1e-6)


def test_select_ops_measures_cuda_kernels_at_the_model_shapes(monkeypatch):
    """On CUDA (faked), select_ops runs the load-time measurements itself, before any model
    exists, at the shapes it is given; nothing is measured without shapes."""
    import rerank_kernels
    calls = []

    def measure(ops, hidden, intermediate, heads, dtype, device, *, max_rows, timer):
        calls.append((hidden, intermediate, heads, dtype, device.type, max_rows))
        return replace(ops, choices={"measured": {}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tuning, "measure_cuda_ops", measure)
    assert rerank_kernels.select_ops("cuda", "triton").choices == {} and calls == []
    ops = rerank_kernels.select_ops("cuda", "triton", dtype=torch.bfloat16,
                                    shapes=rerank_kernels.ModelShapes(64, 256, 4, ffn_rows=512))
    assert calls == [(64, 256, 4, torch.bfloat16, "cuda", 512)] and ops.choices == {"measured": {}}


def test_info_shows_the_choices(tmp_path):
    """GET /info (RerankService.describe) carries the op set's choices as they are."""
    from types import SimpleNamespace

    from rerank_server.service import RerankService
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.30, 0.40, 0.50)))
    ops = choose(gpu)
    service = RerankService(["m"], max_documents=10)
    model = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float16, ops=ops,
                            config=SimpleNamespace(num_layers=2, hidden_size=64, family="xlm-roberta"))
    service.engine = SimpleNamespace(model=model, max_length=512, model_dir=tmp_path)
    info = json.loads(json.dumps(service.describe()))
    assert info["kernel_choices"] == ops.choices
    assert info["kernel_choices"]["ffn_up_gelu"]["rows<=64"]["chosen"] == "cublas+bias_gelu"
    assert info["kernel_choices"]["ffn_up_gelu"]["rows>512"]["timings_ms"] == {"cublas+bias_gelu": 1.0,
                                                                              "triton-fused": 0.5}


# ----------------------------------------------------------------------------- attention configurations

HEADS, HEAD_DIM = 2, 32


class FakeAttention:
    """The Triton attention stood in by the reference: records which configuration each call
    used (by candidate name, "default" without one); the timer answers per (tier, name)."""

    def __init__(self, times: dict[tuple[int, str], float], failing: str | None = None):
        self.times, self.failing = times, failing
        self.calls: list[tuple[int, str]] = []

    def kernel(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, configs=None):
        tier = attention.attention_block_m(max_q, q.shape[-1])
        config = (configs or {}).get(tier)
        names = {repr(c): n for n, c in attention.attention_config_candidates(q.shape[-1], tier).items()}
        name = "default" if config is None else names[repr(config)]
        self.calls.append((tier, name))
        if name == self.failing:
            raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")
        return attention.varlen_attention_torch(q, k, v, cu_q, cu_k, max_q, max_k, scale)

    def timer(self, fn) -> float:
        fn()
        return self.times.get(self.calls[-1], 1.0)


def small_workloads():
    return tuning.attention_workloads(HEADS, HEAD_DIM, torch.float32, torch.device("cpu"), tokens=600)


def choose_attention(fake: FakeAttention, backend: str = "triton") -> Ops:
    ops = replace(TORCH_OPS, attention_backend=backend)
    return tuning.choose_attention_configs(ops, HEADS, HEAD_DIM, torch.float32, torch.device("cpu"),
                                           timer=fake.timer, workloads=small_workloads(), kernel=fake.kernel)


def test_attention_workloads_cover_every_query_tier():
    workloads = small_workloads()
    assert sorted(workloads) == [16, 64, 128]
    for tier, (q, k, _v, cu_q, cu_k, max_q, max_k, _scale) in workloads.items():
        assert attention.attention_block_m(max_q, HEAD_DIM) == tier
        assert int(cu_k[-1]) == k.shape[0] >= 600 and int(cu_q[-1]) == q.shape[0]
        assert (cu_k[1:] - cu_k[:-1]).max() <= max_k
    assert workloads[16][5] == 1  # the last layer: one query per sequence
    # above head_dim 64 long sequences use 64-row query blocks: two tiers
    assert sorted(tuning.attention_workloads(2, 128, torch.float32, torch.device("cpu"), tokens=300)) == [16, 64]


def test_attention_config_wins_only_where_faster(caplog):
    fake = FakeAttention({(16, "default"): 1.0, (16, "n128-s3-unmasked"): 0.5,  # wins
                          (64, "default"): 1.0, (64, "n64-s3-unmasked"): 0.98,  # a tie: default stays
                          (128, "default"): 0.5})  # every candidate slower (1.0)
    with caplog.at_level(logging.INFO, logger="rerank_kernels.tuning"):
        ops = choose_attention(fake)
    report = ops.choices[tuning.ATTENTION]
    assert {tier: r["chosen"] for tier, r in report.items()} == {
        "block_m=16": "n128-s3-unmasked", "block_m=64": "default", "block_m=128": "default"}
    assert set(report["block_m=16"]["timings_ms"]) == {"default", *attention.attention_config_candidates(HEAD_DIM, 16)}
    # the op set's attention runs the chosen configuration for its tier, the default elsewhere
    fake.calls.clear()
    for args in small_workloads().values():
        ops.varlen_attention(*args)
    assert fake.calls == [(16, "n128-s3-unmasked"), (64, "default"), (128, "default")]
    json.dumps(ops.choices)
    assert any(r.getMessage().startswith("attention configurations measured in ") for r in caplog.records)


def test_attention_default_everywhere_keeps_the_op():
    fake = FakeAttention({(t, "default"): 0.1 for t in (16, 64, 128)})
    ops = choose_attention(fake)
    assert ops.varlen_attention is TORCH_OPS.varlen_attention
    assert all(r["chosen"] == "default" for r in ops.choices[tuning.ATTENTION].values())


def test_failing_attention_config_is_left_out(caplog):
    fake = FakeAttention({(128, "n128-s3-unmasked"): 0.01, (128, "n64-s2-unmasked"): 0.5}, failing="n128-s3-unmasked")
    with caplog.at_level(logging.WARNING, logger="rerank_kernels.tuning"):
        ops = choose_attention(fake)
    tier = ops.choices[tuning.ATTENTION]["block_m=128"]
    assert tier["chosen"] == "n64-s2-unmasked"  # the fastest that runs
    assert tier["failed"]["n128-s3-unmasked"].startswith("RuntimeError: triton.runtime.errors.OutOfResources")
    assert "n128-s3-unmasked" not in tier["timings_ms"]
    assert any("candidate n128-s3-unmasked is not used" in r.getMessage() for r in caplog.records)


def test_attention_not_measured_for_other_backends():
    fake = FakeAttention({})
    ops = choose_attention(fake, backend="flash-attn")
    assert fake.calls == [] and tuning.ATTENTION not in ops.choices


def test_tune_ops_measures_both_at_the_model_shapes(monkeypatch):
    """What Engine.load runs on CUDA: the FFN tiers up to the slice size, then the attention
    tiers with the head_dim the weights imply (hidden 32 / 2 heads = 16)."""
    gpu = FakeGpu(times(baseline=(0.10, 0.50, 1.00), fused=(0.05, 0.30, 0.70)))
    seen_head_dims = []
    workloads = tuning.attention_workloads
    monkeypatch.setattr(tuning, "attention_workloads", lambda *args: workloads(*args, tokens=300))

    def timer(fn) -> float:
        fn()
        return 1.0

    def kernel(q, *args, configs=None):
        seen_head_dims.append(q.shape[-1])
        return attention.varlen_attention_torch(q, *args)

    ops = replace(TORCH_OPS, attention_backend="triton", measured_linear_gelu=gpu.baseline)
    ops = tuning.tune_ops(ops, *weights(), heads=2, max_rows=1024, timer=timer,
                          fused=gpu.fused, attention_kernel=kernel)
    assert list(ops.choices) == [tuning.FFN_UP, tuning.ATTENTION]
    assert list(ops.choices[tuning.ATTENTION]) == ["block_m=16", "block_m=64", "block_m=128"]
    assert set(seen_head_dims) == {16}


def test_measure_cuda_ops_uses_random_weights_of_the_model_shapes():
    """What select_ops runs on CUDA, here on CPU tensors with a stand-in fused kernel: the
    up-projection is measured on an (intermediate, hidden) weight made for the purpose."""
    seen = []

    def fused(x, weight, bias):
        seen.append((tuple(x.shape), tuple(weight.shape), weight.dtype))
        return linear_gelu_torch(x, weight, bias)
    ops = tuning.measure_cuda_ops(replace(TORCH_OPS, attention_backend="flash-attn"), HIDDEN, INTERMEDIATE, 2,
                                  torch.float32, torch.device("cpu"), max_rows=100, timer=lambda fn: (fn(), 1.0)[1],
                                  fused=fused)
    assert list(ops.choices) == [tuning.FFN_UP] and list(ops.choices[tuning.FFN_UP]) == ["rows<=64", "rows>64"]
    assert {s[1:] for s in seen} == {((INTERMEDIATE, HIDDEN), torch.float32)} and (100, HIDDEN) in {s[0] for s in seen}
