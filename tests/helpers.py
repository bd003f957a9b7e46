"""Helpers shared by test modules: live server subprocesses and the requests they answer.
Fixtures stay in conftest.py (which imports from here); what more than one test module uses
lives here rather than being imported from conftest or from another test module. The kernel
tests' helpers (a verbose allclose, the interpreter child) are in tensor_checks.py."""
from __future__ import annotations

import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import requests
from clients.quickstart import DOCS, QUERY  # noqa: F401  (re-exported: the seed's quick-start request)
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from rerank_server.schema import pb, pb_grpc

ROOT = Path(__file__).resolve().parent.parent
SERVED_MODEL = "BAAI/bge-reranker-v2-m3"
QUEUED = "rerank_queued_tokens"  # the gauge of tokens waiting in the scheduler's queue
WORDS = ("the a of to and in is was for on with as by at from that which model data system time "
         "people water energy market city river music language history science school health "
         "research network computer study report court policy company price growth climate "
         "species protein cell light sound design garden kitchen train bridge mountain island "
         "ancient modern early later public private local national global digital natural human "
         "quickly often rarely never always slowly carefully recently finally mostly").split()


# ---------------------------------------------------------------- server processes

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
                 env: dict[str, str] | None = None, flags: bool = True, open_files: int | None = None) -> LiveServer:
    """``env`` is added to the environment; ``flags=False`` passes no default flags (the
    caller sets model, ports etc. through ``extra`` or RERANK_* variables in ``env``, and
    the returned URLs come from RERANK_HTTP_PORT / RERANK_GRPC_PORT there). ``open_files``:
    the server's limit on open file descriptors (RLIMIT_NOFILE)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if flags:
        http_port, grpc_port = free_port(), free_port()
        args = ["--model", str(checkpoint), "--served-model-name", SERVED_MODEL, "reranker",
                "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    else:
        http_port, grpc_port = int(env.get("RERANK_HTTP_PORT", 8000)), int(env.get("RERANK_GRPC_PORT", 50051))
        args = []
    log = open(log_path, "w")
    def limit_open_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    process = subprocess.Popen([sys.executable, "-m", "rerank_server", *args, *extra],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                               preexec_fn=limit_open_files if open_files else None)
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


def wait_exit(server: LiveServer, timeout: float = 60) -> tuple[int, str]:
    try:
        code = server.process.wait(timeout)
    except Exception:
        server.process.kill()
        server.process.wait()
        raise
    return code, server.log()


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\b(ERROR|CRITICAL)\b", line)]


def poll(predicate, timeout: float = 90, what: str = "a condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- requests

def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def body(query: str, docs: list, **fields) -> dict:
    return {"model": SERVED_MODEL, "query": query, "documents": docs, **fields}


def post(server: LiveServer, payload: dict, headers: dict | None = None, timeout: float = 120,
         **kwargs) -> requests.Response:
    return requests.post(server.http_url + "/v1/rerank", json=payload, headers=headers, timeout=timeout, **kwargs)


def grpc_request(query: str, docs: list[str], **fields) -> pb.RerankRequest:
    return pb.RerankRequest(model=SERVED_MODEL, query=query,
                            documents=[struct_pb2.Value(string_value=d) for d in docs], **fields)


def stub(server: LiveServer, credentials: grpc.ChannelCredentials | None = None):
    channel = (grpc.secure_channel(server.grpc_address, credentials) if credentials
               else grpc.insecure_channel(server.grpc_address))
    return channel, pb_grpc.RerankStub(channel)


def scrape(server: LiveServer, headers: dict | None = None, scheme_url: str | None = None,
           **kwargs) -> dict[str, float]:
    """GET /metrics -> {'name{label="v",...}': value}, labels sorted by name."""
    r = requests.get((scheme_url or server.http_url) + "/metrics", headers=headers, timeout=30, **kwargs)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def assert_pairs_as_transformers(checkpoint: Path, truncation: str, max_lengths: tuple[int, ...]) -> None:
    """Our PairTokenizer's pairs (ids and token types) == transformers' tokenizer built from the same
    tokenizer.json (PreTrainedTokenizerFast: the file's own template), cut as sentence-transformers'
    CrossEncoder cuts them (``truncation=True``: longest_first), short and long queries alike."""
    import transformers

    from rerank_server.tokenization import PairTokenizer
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    rng = random.Random(5)
    for max_length in max_lengths:
        ours = PairTokenizer(checkpoint / "tokenizer.json", max_length, truncation=truncation)
        for query in ("what is the capital of france?", sentence(rng, 60), sentence(rng, 3 * max_length)):
            docs = ["", "x", "  Paris  is the capital\tof France.  ", sentence(rng, 2 * max_length),
                    sentence(rng, max_length // 3), "Ünïcödé, 中文 und emoji 🙂 [CLS] text."]
            pairs = ours.encode_pairs(query, docs)
            expected = reference([query] * len(docs), docs, truncation=True, max_length=max_length,
                                 return_token_type_ids=True)
            assert [list(p) for p in pairs] == expected["input_ids"], max_length
            assert [[int(i >= p.type_start) for i in range(len(p))] for p in pairs] == expected["token_type_ids"]
            assert max(map(len, pairs)) == max_length


def assert_engine_batch_invariant(engine, pairs: list) -> None:
    """Each pair's score is bitwise the same alone and in other batches: the first five alone and
    pairs 6-9 as a batch of their own, against all of ``pairs`` (at least 10) in one call."""
    together = engine.forward(pairs)
    assert [engine.forward([p])[0] for p in pairs[:5]] == together[:5]
    assert engine.forward(pairs[6:10]) == together[6:10]
