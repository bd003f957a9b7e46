"""--dtype int8 on trained weights (benchmarks.fidelity_int8): all-MiniLM-L6-v2 under a seeded
head, real English queries and documents; our int8 logits against our float32 ones, beside
onnxruntime's dynamic int8 (transformers optimizer + quantize_dynamic) of the same weights.
Per-row activation scales must err no more than onnxruntime's per-tensor ones."""
from __future__ import annotations

import pytest
import torch

from benchmarks.fidelity_int8 import measure
from benchmarks.onnx_baseline import onnx_unavailable_reason
from benchmarks.wheels import Unavailable
from rerank_kernels.linear_int8 import int8_missing


@pytest.mark.slow
@pytest.mark.skipif(int8_missing() is not None, reason=f"no int8 on this CPU: {int8_missing()}")
@pytest.mark.skipif(onnx_unavailable_reason() is not None, reason=f"{onnx_unavailable_reason()}")
def test_int8_errs_no_more_than_onnxruntime_int8_on_trained_weights(tmp_path, capsys):
    try:
        found = measure(tmp_path, queries=12, documents=12, threads=torch.get_num_threads())
    except Unavailable as e:
        pytest.skip(str(e))
    systems = found["systems"]
    with capsys.disabled():
        print(f"\nint8 on all-MiniLM-L6-v2 ({found['pairs']} pairs, fp32 logit std {found['float32_logit_std']:.2f}):")
        for name, s in systems.items():
            print(f"  {name}: max |logit - fp32| {s['logit_error_max']:.4f}, mean {s['logit_error_mean']:.4f}, "
                  f"top-1/3/5 overlap {s['top1_overlap']:.2f}/{s['top3_overlap']:.2f}/{s['top5_overlap']:.2f}, "
                  f"Kendall tau mean {s['kendall_tau_mean']:.3f}")
    ours, peer = systems["ours int8"], systems["onnxruntime int8"]
    assert found["float32_logit_std"] > 0.2  # trained weights spread the logits (random ones ~0.08)
    assert systems["onnxruntime fp32"]["logit_error_max"] < 1e-3  # the peer runs the same model
    assert ours["logit_error_max"] > 0  # int8 did run
    assert ours["logit_error_max"] <= peer["logit_error_max"], (ours, peer)
    assert ours["logit_error_mean"] <= peer["logit_error_mean"], (ours, peer)
    assert ours["kendall_tau_mean"] >= peer["kendall_tau_mean"] - 0.02, (ours, peer)
