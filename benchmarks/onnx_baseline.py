"""onnxruntime fp32, one pair at a time: the strongest CPU peer (GUIDE section 5).

The Hugging Face model of a checkpoint is exported once with ``torch.onnx`` (the TorchScript
exporter, ``dynamo=False``: seconds for the tiny model and no extra package; dynamic batch and
sequence axes) into ``<checkpoint>-onnx/model.onnx`` beside the checkpoint (a full-size model is
~2.3 GB, held as external data in that directory), in a child process so that the export's
memory is returned before anything is timed:

    python -m benchmarks.onnx_baseline --export checkpoints/full-random

onnxruntime then runs each pair alone (batch 1, no padding), as a simple server on it does.
Needs the ``bench`` extra: ``pip install -e '.[bench]'``.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
ONNX_OPSET = 17


def onnx_unavailable_reason() -> str | None:
    """Why the onnxruntime baseline cannot run here, or None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[bench]')"
    return None


def onnx_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + "-onnx") / "model.onnx"


def export_onnx(checkpoint: Path, out: Path) -> None:
    """The checkpoint's XLMRobertaForSequenceClassification (fp32, eager attention: the graph
    onnxruntime's fusions recognize) -> ``out``: inputs input_ids, attention_mask (batch,
    sequence) int64, output logits (batch, 1)."""
    from transformers import XLMRobertaForSequenceClassification

    model = XLMRobertaForSequenceClassification.from_pretrained(
        checkpoint, attn_implementation="eager", dtype=torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    ids = torch.full((1, 16), 5, dtype=torch.int64)
    ids[0, 0], ids[0, -1] = 0, 2
    axes = {0: "batch", 1: "sequence"}
    with torch.inference_mode():
        torch.onnx.export(Logits(), (ids, torch.ones_like(ids)), str(out), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}})


def ensure_onnx(checkpoint: Path) -> Path:
    """The cached export of ``checkpoint`` (written by a child process through a temporary
    directory, so that a half-written one is never reused)."""
    path = onnx_path(checkpoint)
    if path.exists():
        return path
    tmp = path.parent.with_name(path.parent.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"exporting {checkpoint.name} to ONNX ({path.parent}) ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.onnx_baseline", "--export", str(checkpoint),
                           "--out", str(tmp / path.name)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ONNX export failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    tmp.rename(path.parent)
    size = sum(f.stat().st_size for f in path.parent.iterdir())
    print(f"  done in {time.perf_counter() - t0:.0f} s ({size / 2**30:.2f} GiB)", flush=True)
    return path


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # as many as torch uses
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxPerPair:
    """An onnxruntime session on the export; ``__call__(docs)`` scores each token-id array
    alone -> (len(docs),) fp32 logits."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.version = ort.__version__

    def __call__(self, docs: list[np.ndarray]) -> torch.Tensor:
        logits = []
        for ids in docs:
            ids = ids.reshape(1, -1).astype(np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            logits.append(self.session.run(["logits"], feed)[0][0, 0])
        return torch.tensor(np.array(logits, dtype=np.float32))


def matmul_calls(k: int, n: int, m: int, threads: int, seed: int = 1):
    """A one-node onnxruntime graph Y = X @ W + B at (m, k) x (k, n), as the exported model's
    linear layers run: -> a callable that runs it once."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])], "linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k)).astype(np.float32)
    return lambda: session.run(["Y"], {"X": x})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="checkpoint directory to export")
    p.add_argument("--out", type=Path, help="ONNX file (default <checkpoint>-onnx/model.onnx, cached)")
    args = p.parse_args(argv)
    if args.out is None:
        print(ensure_onnx(args.export.resolve()))
        return
    export_onnx(args.export, args.out)


if __name__ == "__main__":
    main()
