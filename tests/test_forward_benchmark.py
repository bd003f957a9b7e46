"""The forward benchmark measures what the server does: its batches are the scheduler's."""
import asyncio
import shutil

import numpy as np
import pytest
import torch

from benchmarks.forward import parse_args
from benchmarks.forward_summary import cpu_targets
from benchmarks.gemm import candidates
from benchmarks.onnx_baseline import OnnxPerPair, ensure_onnx, export_onnx, onnx_path, onnx_unavailable_reason
from benchmarks.rest_e2e import make_request
from benchmarks.workloads import make_docs, make_latency_workload, pack_ours
from rerank_kernels.linear_int8 import int8_missing
from rerank_server.engine import Engine
from rerank_server.scheduler import Scheduler, launch_now


def scheduler_batches(docs: list[list[int]], max_batch_tokens: int, max_batch_pairs: int) -> list[list[int]]:
    """The lengths of each batch the scheduler forms for ``docs`` queued as one request."""
    batches = []

    def forward(pairs):
        batches.append([len(p) for p in pairs])
        return [0.0] * len(pairs)

    async def main():
        s = Scheduler(launch_now(forward), max_batch_tokens, 10 ** 9, max_batch_pairs=max_batch_pairs)
        s.start()
        try:
            await s.score(docs)
        finally:
            await s.close()
    asyncio.run(main())
    return batches


@pytest.mark.parametrize("max_batch_tokens,max_pairs", [(2048, 65535), (16384, 65535), (100_000, 7)])
def test_latency_request_is_split_as_the_scheduler_splits_it(max_batch_tokens, max_pairs):
    w = make_latency_workload(100, 1000, seed=0)
    ours = pack_ours(w.docs, max_batch_tokens, torch.device("cpu"), max_pairs=max_pairs)
    got = [(cu[1:] - cu[:-1]).tolist() for _, cu, _ in ours]
    want = scheduler_batches([d.tolist() for d in w.docs], max_batch_tokens, max_pairs)
    assert got == want
    assert [max_len for _, _, max_len in ours] == [max(b) for b in want]
    if max_batch_tokens < w.tokens or max_pairs < 100:
        assert len(got) > 1, "the case must split the request to mean anything"


# --------------------------------------------------------------------------- the onnxruntime baseline

def test_onnxruntime_per_pair_scores_as_transformers_does(tiny_checkpoint, tmp_path):
    """The export (torch.onnx, dynamic axes, cached beside the checkpoint) runs each pair alone
    with the scores of transformers' model on the same weights."""
    reason = onnx_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the onnxruntime baseline needs the bench extra: {reason}")
    from transformers import XLMRobertaForSequenceClassification

    checkpoint = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint, checkpoint)
    path = onnx_path(checkpoint)
    path.parent.mkdir()
    export_onnx(checkpoint, path)  # in-process: ensure_onnx's child would import torch and transformers again
    assert ensure_onnx(checkpoint) == path  # cached beside the checkpoint: not exported again
    rng = np.random.default_rng(0)
    docs = make_docs([5, 37, 16, 130], 1000, rng)
    got = OnnxPerPair(path, threads=1)(docs)
    hf = XLMRobertaForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.inference_mode():
        want = torch.cat([hf(input_ids=torch.from_numpy(d)[None]).logits[:, 0] for d in docs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_gemm_candidates_compute_the_same_linear():
    """Every GEMM candidate whose rate the benchmark reports computes x @ w^T + b."""
    g = torch.Generator().manual_seed(0)
    found = candidates(torch.device("cpu"), torch.float32)
    assert "F.linear" in found
    if onnx_unavailable_reason() is None:
        assert "onnxruntime MatMul" in found
    outputs = {name: build(64, 48, 8, torch.float32, torch.device("cpu"), g.manual_seed(0))()
               for name, build in found.items()}
    want = outputs.pop("F.linear")
    for name, y in outputs.items():
        y = torch.as_tensor(y[0] if isinstance(y, list) else y)  # onnxruntime returns [array]
        # onnxruntime draws its inputs from its own generator: compare shapes there, values for torch's
        if name == "onnxruntime MatMul":
            assert y.shape == want.shape
        else:
            torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_cpu_targets_compare_with_onnxruntime_per_dtype():
    def entry(rate, contended=False):
        return {"tokens_per_s": rate, "contended": contended}
    results = {"mixed": {"ours": {**entry(130.0), "useful_fraction_of_gemm_rate": 0.9},
                         "ours-bf16": entry(150.0), "onnxruntime": entry(100.0)}}
    targets = cpu_targets(results, rss=None)
    assert targets["mixed_ours_fp32_over_onnxruntime_fp32_per_pair>=1.2"]["pass"]
    assert not targets["mixed_ours_bf16_over_onnxruntime_fp32_per_pair>=2"]["pass"]
    assert targets["mixed_ours_fp32_useful_fraction_of_best_fp32_gemm>=0.85"]["value"] == 0.9


def test_dtype_list_is_checked():
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--dtype", "float16"])  # CUDA only
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--dtype", "float64"])
    assert parse_args(["--quick", "--dtype", "float32"]).dtypes == ["float32"]


def test_rest_request_is_what_the_server_tokenizes(tiny_checkpoint):
    """The end-to-end request (benchmarks.rest_e2e): documents of mixed lengths whose pairs,
    as the server's tokenizer makes them, are the tokens counted."""
    query, documents, pairs = make_request(tiny_checkpoint, 16, seed=0)
    assert len(documents) == len(pairs) == 16
    assert pairs == Engine.load_tokenizer(tiny_checkpoint).encode_pairs(query, documents)
    assert len({len(p) for p in pairs}) > 8, "mixed lengths"


@pytest.mark.skipif(int8_missing() is not None, reason=f"no int8 on this CPU: {int8_missing()}")
def test_int8_in_the_forward_benchmark():
    """--dtype int8 is accepted on the CPU (and by default where the CPU has it), refused on CUDA;
    its GEMM-rate candidates are the server's int8 linears, computing x @ w^T + b to int8 rounding."""
    assert parse_args(["--quick", "--dtype", "float32,int8"]).dtypes == ["float32", "int8"]
    assert "int8" in parse_args(["--quick"]).dtypes
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--device", "cuda", "--dtype", "int8"])
    found = candidates(torch.device("cpu"), torch.int8)
    assert set(found) >= {"torch._int_mm per-row"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g)
    w = torch.randn(48, 64, generator=g) * 0.02
    want = torch.nn.functional.linear(x, w, torch.randn(48, generator=g))
    for name, build in found.items():
        got = build(64, 48, 8, torch.int8, torch.device("cpu"), g.manual_seed(0))()
        assert (got - want).abs().max() < 0.05, name  # the same inputs: int8 rounding apart
