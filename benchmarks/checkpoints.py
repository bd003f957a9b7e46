"""The benchmarks' random-weight checkpoints, written once and cached under checkpoints/."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from rerank_server.checkpoint import write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT_SUFFIX = {torch.float32: "", torch.float16: "-fp16"}  # the CPU's files, CUDA's


def ensure_checkpoint(size: str, dtype: torch.dtype = torch.float32) -> Path:
    """checkpoints/<size>-random[-fp16] (seed 0), written through a temporary directory so
    that a half-written one is never reused. fp16 files hold the fp32 ones' values rounded."""
    path = REPO / "checkpoints" / f"{size}-random{CHECKPOINT_SUFFIX[dtype]}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"writing a random {size} checkpoint to {path} ...", flush=True)
    write_random_checkpoint(tmp, size, seed=0, dtype=dtype)
    tmp.rename(path)
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return path
