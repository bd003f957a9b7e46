"""Shared fixtures: random-weight checkpoints around the real tokenizer, and a live server.
Helpers live in helpers.py; this file keeps only fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import start_server

from rerank_server.checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """2 layers, hidden 64, the real 250002-piece vocabulary; LayerNorms and biases off their init."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=1)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """6 layers x 384 (MiniLM-L6 shapes, 436 MB): where a test needs forwards slow enough to
    watch (a load, a drain) without thousands of documents to tokenize."""
    return write_random_checkpoint(tmp_path_factory.mktemp("small"), "small", seed=3)


@pytest.fixture(scope="session")
def live_server(tiny_checkpoint, tmp_path_factory):
    """One server for the API tests, on free loopback ports; served as BAAI/bge-reranker-v2-m3
    with the alias "reranker". Must exit 0 on SIGTERM at the end."""
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "server.log",
                          "--max-documents", "50", "--max-request-bytes", "200000")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def two_threads():
    """torch on two threads for one test (the C kernels split their work over torch's threads),
    then back to what it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
