"""The CPU peers, each in its own process, on the same token ids, one pair at a time:

- ``onnxruntime-fp32``: the checkpoint's ONNX export (benchmarks.onnx_baseline);
- ``onnxruntime-int8``: the export fused by onnxruntime's transformers optimizer, then
  ``quantize_dynamic`` (int8 weights, per-tensor dynamic activation scales), as users run
  "onnx-qint8" rerankers;
- ``openvino-f32`` / ``openvino-bf16``: OpenVINO on the same export with
  ``INFERENCE_PRECISION_HINT`` set explicitly (on a bf16-capable CPU OpenVINO runs bf16 when
  asked for nothing).

A separate process per peer: OpenVINO on AMD CPUs is "not officially supported" (a SIGFPE in
``compile_model`` was reported on Zen 4), and a crash must cost one row, not the run. The
parent (``run_peers``) writes the token ids to a file; the child loads its peer, warms it up,
times ``--repeats`` passes over all pairs (recording the machine's load) and writes JSON.

    python -m benchmarks.peers --checkpoint DIR --ids ids.json --peer onnxruntime-int8 --out out.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.measure import MachineLoad, wait_quiet
from benchmarks.onnx_baseline import REPO, OnnxPerPair, ensure_onnx, onnx_path

PEERS = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-f32", "openvino-bf16")


def int8_onnx_path(checkpoint: Path) -> Path:
    return onnx_path(checkpoint).with_name("model-optimized-int8.onnx")


def ensure_onnx_int8(checkpoint: Path) -> Path:
    """The cached int8 model of ``checkpoint``: the fp32 export, fused by the transformers
    optimizer (attention, skip-LayerNorm, bias-GELU), then ``quantize_dynamic``."""
    out = int8_onnx_path(checkpoint)
    if out.exists():
        return out
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    config = json.loads((checkpoint / "config.json").read_text())
    fp32 = ensure_onnx(checkpoint)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        fused = Path(tmp) / "model-optimized.onnx"
        optimizer.optimize_model(str(fp32), model_type="bert", num_heads=config["num_attention_heads"],
                                 hidden_size=config["hidden_size"]).save_model_to_file(
            str(fused), use_external_data_format=True)
        staged = Path(tmp) / out.name
        # the fused graph's ops (Attention, SkipLayerNormalization) leave output types the quantizer
        # cannot infer: they are float
        quantize_dynamic(str(fused), str(staged), weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        for f in Path(tmp).iterdir():  # the model and its external data file
            if f.name.startswith(out.name):
                shutil.move(str(f), out.parent / f.name)
    return out


class OpenVinoPerPair:
    """OpenVINO on the fp32 export at an explicit precision; ``__call__`` as ``OnnxPerPair``'s."""

    def __init__(self, path: Path, threads: int, precision: str):
        import openvino as ov

        self.path, self.version = path, ov.__version__
        core = ov.Core()
        self.compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                               "INFERENCE_NUM_THREADS": threads,
                                                               "PERFORMANCE_HINT": "LATENCY"})
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.request = self.compiled.create_infer_request()

    def __call__(self, docs: list[np.ndarray]) -> torch.Tensor:
        logits = []
        for ids in docs:
            ids = ids.reshape(1, -1).astype(np.int64)
            out = self.request.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})
            logits.append(next(iter(out.values()))[0, 0])
        return torch.tensor(np.array(logits, dtype=np.float32))


def load_peer(name: str, checkpoint: Path, threads: int) -> Callable[[list[np.ndarray]], torch.Tensor]:
    if name == "onnxruntime-fp32":
        return OnnxPerPair(ensure_onnx(checkpoint), threads)
    if name == "onnxruntime-int8":
        return OnnxPerPair(ensure_onnx_int8(checkpoint), threads)
    if name in ("openvino-f32", "openvino-bf16"):
        return OpenVinoPerPair(ensure_onnx(checkpoint), threads, name.removeprefix("openvino-"))
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


def child(args: argparse.Namespace) -> None:
    pairs = [np.asarray(p, dtype=np.int64) for p in json.loads(args.ids.read_text())]
    t0 = time.perf_counter()
    peer = load_peer(args.peer, args.checkpoint, args.threads)
    load_s = time.perf_counter() - t0
    logits = peer(pairs)  # warm-up
    runs = []
    for _ in range(args.repeats):
        waited = wait_quiet(args.quiet_wait)
        with MachineLoad() as load:
            peer(pairs)
        runs.append({"s": load.wall, "foreign_cpus": load.foreign_cpus, "contended": load.contended, **waited})
    args.out.write_text(json.dumps({"peer": args.peer, "version": peer.version, "load_s": load_s,
                                    "precision": getattr(peer, "precision", None), "model": str(peer.path),
                                    "runs": runs, "logits": logits.tolist()}))


def run_peers(checkpoint: Path, pairs: list[list[int]], names: tuple[str, ...] = PEERS, *, repeats: int = 3,
              quiet_wait: float = 0.0, threads: int | None = None, timeout_s: float = 3600) -> dict[str, dict]:
    """name -> the child's record plus ``tokens_per_s`` (median of the uncontended runs, else of
    all) and ``contended``; or {"error": ...} where the child failed (a crash, a missing package)."""
    tokens = sum(map(len, pairs))
    threads = threads or torch.get_num_threads()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.json"
        ids.write_text(json.dumps([list(p) for p in pairs]))
        for name in names:
            out = Path(tmp) / f"{name}.json"
            print(f"peer {name} (own process) ...", flush=True)
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--checkpoint", str(checkpoint),
                                       "--ids", str(ids), "--peer", name, "--repeats", str(repeats),
                                       "--quiet-wait", str(quiet_wait), "--threads", str(threads), "--out", str(out)],
                                      cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                results[name] = {"error": f"timed out after {timeout_s:.0f} s"}
                continue
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-3:]
                results[name] = {"error": f"exit status {proc.returncode}: {' | '.join(tail)}"}
                print(f"  {name} failed: {results[name]['error']}", flush=True)
                continue
            record = json.loads(out.read_text())
            clean = [r["s"] for r in record["runs"] if not r["contended"]]
            median = statistics.median(clean or [r["s"] for r in record["runs"]])
            record.update(median_s=median, tokens_per_s=tokens / median, clean_runs=len(clean), contended=not clean)
            results[name] = record
            print(f"  {name} {record['version']}: {record['tokens_per_s']:,.0f} tokens/s"
                  f"{' (contended)' if not clean else ''}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--ids", type=Path, required=True, help="JSON list of token-id lists, one per pair")
    p.add_argument("--peer", choices=PEERS, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quiet-wait", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, required=True)
    child(p.parse_args(argv))


if __name__ == "__main__":
    main()
