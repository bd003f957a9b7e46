"""Shared helpers for kernel tests (interpreter and GPU): a verbose allclose, and a child
process under Triton's interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(worker: str, *args) -> None:
    """Runs ``worker`` (Python source; ``args`` as its sys.argv[1:]) in a child with
    TRITON_INTERPRET=1: the variable only takes effect if set before triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", worker, *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"interpreter child failed:\n{result.stderr[-5000:]}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "",
                 show: int = 10) -> None:
    """allclose that, on failure, names the mismatching indices with both values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol) | (a.isnan() != e.isnan())
    if not bad.any():
        return
    idx = bad.nonzero()
    lines = [f"{what}: {len(idx)} of {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
             f"max abs diff {(a - e).abs().nan_to_num(float('inf')).max().item():.3g}"]
    for i in idx[:show].tolist():
        lines.append(f"  at {tuple(i)}: got {a[tuple(i)].item():.6g}, expected {e[tuple(i)].item():.6g}")
    if len(idx) > show:
        lines.append(f"  ... and {len(idx) - show} more")
    pytest.fail("\n".join(lines))
