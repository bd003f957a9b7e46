"""Reading a checkpoint's ``*.safetensors`` straight into a model's preallocated weights.

A model names where each checkpoint tensor goes (``destination(name) -> tensor or None``) and
lists the weights it needs (``named_weights()``); each tensor is read from the file into its
destination slice (through one per-tensor staging buffer when the dtype or device differs), so
peak memory is the weights plus the largest single tensor: no second copy of the model, no
mmap of the whole file (which would keep its pages resident beside the weights).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rerank_server.models.registry import UnsupportedModelError

log = logging.getLogger(__name__)

# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def model_tensors(model, skip=frozenset(), skip_in_layers=frozenset()):
    """(name, tensor) for every tensor attribute of ``model``, then of each of ``model.layers``
    (named ``layers.{i}.{name}``), in a stable order: what a model's ``named_weights`` lists,
    but for the buffers named in ``skip`` / ``skip_in_layers`` that no checkpoint fills."""
    for name, value in vars(model).items():
        if isinstance(value, torch.Tensor) and name not in skip:
            yield name, value
    for i, layer in enumerate(model.layers):
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor) and name not in skip_in_layers:
                yield f"layers.{i}.{name}", value


@dataclass(frozen=True)
class Rows:
    """A destination that takes only ``rows`` of the checkpoint's (n, ...) tensor, in that order."""

    into: torch.Tensor  # (len(rows), ...)
    rows: tuple[int, ...]


def read_safetensors(model, model_dir: Path, dtype: torch.dtype) -> None:
    """Fills ``model`` from every ``*.safetensors`` in ``model_dir``; UnsupportedModelError for
    a tensor of the wrong shape or a weight the checkpoint lacks."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    started = time.perf_counter()
    source_dtypes, read_bytes = set(), 0
    filled: dict[int, int] = {}  # id(weight) -> elements written (Q, K and V each fill a third)
    for file in files:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for name, meta in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                dest = model.destination(name)
                if dest is None:
                    log.debug("ignoring checkpoint tensor %s", name)
                    continue
                rows = None
                if isinstance(dest, Rows):  # only some rows of a large tensor (an LM head's answer tokens)
                    dest, rows = dest.into, dest.rows
                shape, (begin, end) = tuple(meta["shape"]), meta["data_offsets"]
                expected = tuple(dest.shape) if rows is None else (shape[0], *dest.shape[1:])
                if shape != expected or (rows is not None and not all(0 <= r < shape[0] for r in rows)):
                    raise UnsupportedModelError(f"{name}: checkpoint shape {shape} != expected {expected}")
                src_dtype = SAFETENSORS_DTYPES[meta["dtype"]]
                source_dtypes.add(meta["dtype"])
                direct = src_dtype == dest.dtype and dest.device.type == "cpu"
                staging = dest if direct else torch.empty(dest.shape, dtype=src_dtype)
                row_bytes = (end - begin) // max(shape[0], 1) if shape else 0
                pieces = [(begin, end, staging)] if rows is None else [
                    (begin + r * row_bytes, begin + (r + 1) * row_bytes, staging[i]) for i, r in enumerate(rows)]
                for start, stop, into in pieces:
                    f.seek(8 + header_len + start)
                    if f.readinto(memoryview(into.view(torch.uint8).numpy()).cast("B")) != stop - start:
                        raise ValueError(f"{file}: truncated data for {name}")
                    read_bytes += stop - start
                if not direct:
                    dest.copy_(staging)
                owner = dest if dest._base is None else dest._base
                filled[id(owner)] = filled.get(id(owner), 0) + dest.numel()
                del dest, staging, pieces  # the last tensor read: packing may free it
    missing = [name for name, t in model.named_weights() if filled.get(id(t), 0) != t.numel()]
    if missing:
        raise UnsupportedModelError(f"checkpoint in {model_dir} lacks tensors for: {', '.join(missing[:8])}")
    log.info("read %.2f GB of %s weights from %s (%s) into %s on %s in %.1fs", read_bytes / 1e9,
             "/".join(sorted(source_dtypes)), model_dir, ", ".join(f.name for f in files),
             str(dtype).removeprefix("torch."), model.device, time.perf_counter() - started)
