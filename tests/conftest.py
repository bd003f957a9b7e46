"""Shared fixtures: random-weight checkpoints around the real tokenizer, and a live server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from rerank_server.checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SERVED_MODEL = "BAAI/bge-reranker-v2-m3"
# the seed document's quick-start request
QUERY = "What is machine learning?"
DOCS = [
    "Machine learning is a subset of artificial intelligence.",
    "The weather today is sunny and warm.",
    "Deep learning uses neural networks with multiple layers.",
    "Python is a popular programming language.",
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """2 layers, hidden 64, the real 250002-piece vocabulary; LayerNorms and biases off their init."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=1)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """6 layers x 384 (MiniLM-L6 shapes, 436 MB): where a test needs forwards slow enough to
    watch (a load, a drain) without thousands of documents to tokenize."""
    return write_random_checkpoint(tmp_path_factory.mktemp("small"), "small", seed=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen
    http_url: str
    grpc_address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_server(checkpoint: Path | None, log_path: Path, *extra: str, wait: bool = True,
                 env: dict[str, str] | None = None, flags: bool = True) -> LiveServer:
    """``env`` is added to the environment; ``flags=False`` passes no default flags (the
    caller sets model, ports etc. through ``extra`` or RERANK_* variables in ``env``, and
    the returned URLs come from RERANK_HTTP_PORT / RERANK_GRPC_PORT there)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if flags:
        http_port, grpc_port = free_port(), free_port()
        args = ["--model", str(checkpoint), "--served-model-name", SERVED_MODEL, "reranker",
                "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    else:
        http_port, grpc_port = int(env.get("RERANK_HTTP_PORT", 8000)), int(env.get("RERANK_GRPC_PORT", 50051))
        args = []
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "rerank_server", *args, *extra],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = LiveServer(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_path)
    if wait:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if requests.get(server.http_url + "/health", timeout=5).status_code == 200:
                    return server
            except requests.RequestException:  # refused while starting; a read timeout while loading
                pass
            time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"server not ready in 120 s:\n{server.log()}")
    return server


@pytest.fixture(scope="session")
def live_server(tiny_checkpoint, tmp_path_factory):
    """One server for the API tests, on free loopback ports; served as BAAI/bge-reranker-v2-m3
    with the alias "reranker". Must exit 0 on SIGTERM at the end."""
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "server.log",
                          "--max-documents", "50", "--max-request-bytes", "200000")
    yield server
    assert server.stop() == 0, server.log()
