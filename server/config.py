"""Command-line flags, each also readable from an environment variable RERANK_<FLAG>."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from rerank_server.scheduler import MAX_BATCH_PAIRS


GPU_BATCH_TOKENS = 16384  # enough rows to fill an H100's GEMMs; larger adds memory, not speed
CPU_BATCH_TOKENS = 4096  # a CPU's GEMMs are at full rate well below this


def default_max_batch_tokens(asynchronous_device: bool, max_length: int) -> int:
    return max(GPU_BATCH_TOKENS if asynchronous_device else CPU_BATCH_TOKENS, max_length)


@dataclass(frozen=True)
class Config:
    model: str
    served_model_name: list[str]
    host: str
    http_port: int
    grpc_port: int
    max_length: int | None
    device: str
    attention: str | None
    max_batch_tokens: int | None  # None: by device, see default_max_batch_tokens
    max_queued_tokens: int
    batching: bool
    max_documents: int
    max_request_bytes: int
    shutdown_grace: float
    log_level: str
    log_json: bool
    api_keys: list[str]
    metrics_auth: bool
    tls_cert: str | None
    tls_key: str | None


def _env(flag: str, default):
    return os.environ.get("RERANK_" + flag.upper().replace("-", "_"), default)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="rerank-server",
        description="Rerank service: gRPC and REST in one process. Every flag can also be set by "
                    "an environment variable RERANK_<FLAG> (e.g. RERANK_HTTP_PORT=8000).")
    add = p.add_argument
    add("--model", default=_env("model", "BAAI/bge-reranker-v2-m3"),
        help="local checkpoint directory or Hugging Face hub id (default: %(default)s)")
    add("--served-model-name", nargs="+", default=_env("served-model-name", None),
        help="name(s) clients must send as `model`; the first is reported in responses "
             "(default: the --model value). Env: comma-separated")
    add("--host", default=_env("host", "0.0.0.0"))
    add("--http-port", type=int, default=int(_env("http-port", 8000)))
    add("--grpc-port", type=int, default=int(_env("grpc-port", 50051)))
    add("--max-length", type=int, default=_env("max-length", None),
        help="tokens per (query, document) pair after truncation (default: the model's, 8192)")
    add("--device", choices=("auto", "cpu", "cuda"), default=_env("device", "auto"))
    add("--attention", default=_env("attention", None),
        help="force an attention backend (flash-attn, torch-varlen, triton, torch-sdpa); default: best available")
    add("--max-batch-tokens", type=int, default=_env("max-batch-tokens", None),
        help=f"real tokens per forward batch, at least --max-length (default {GPU_BATCH_TOKENS} on a GPU, "
             f"{CPU_BATCH_TOKENS} on the CPU, where larger batches are no faster and only add latency); a batch "
             f"also holds at most {MAX_BATCH_PAIRS:,} pairs (the CUDA grid limit FlashAttention's kernels put the "
             f"batch on)")
    add("--max-queued-tokens", type=int, default=int(_env("max-queued-tokens", 2_000_000)),
        help="tokens waiting for the model beyond which new requests get 429 / RESOURCE_EXHAUSTED")
    add("--no-batching", action="store_true", default=_env("no-batching", "") not in ("", "0", "false"),
        help="one request per forward (no batching across requests); for comparisons, not for production")
    add("--max-documents", type=int, default=int(_env("max-documents", 1000)), help="documents per request")
    add("--max-request-bytes", type=int, default=int(_env("max-request-bytes", 16 * 1024 * 1024)),
        help="largest REST body / gRPC message accepted (413 / RESOURCE_EXHAUSTED beyond)")
    add("--shutdown-grace", type=float, default=float(_env("shutdown-grace", 30)),
        help="seconds to finish accepted requests after SIGTERM/SIGINT")
    add("--log-level", default=_env("log-level", "INFO"))
    add("--log-json", action="store_true", default=_env("log-json", "") not in ("", "0", "false"),
        help="one JSON object per log line")
    add("--api-key", action="append", default=None,
        help="accepted API key (repeatable; env RERANK_API_KEY, comma-separated). When set, REST needs "
             "'Authorization: Bearer <key>' and gRPC the same 'authorization' metadata; /health stays open")
    add("--metrics-auth", action="store_true", default=_env("metrics-auth", "") not in ("", "0", "false"),
        help="put GET /metrics behind the API key too")
    add("--tls-cert", default=_env("tls-cert", None), help="PEM certificate: serve both listeners over TLS")
    add("--tls-key", default=_env("tls-key", None), help="PEM private key for --tls-cert")
    a = p.parse_args(argv)
    api_keys = a.api_key or [k.strip() for k in _env("api-key", "").split(",") if k.strip()]
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    names = a.served_model_name
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    max_length = int(a.max_length) if a.max_length is not None else None
    a.max_batch_tokens = int(a.max_batch_tokens) if a.max_batch_tokens is not None else None
    if max_length is not None and a.max_batch_tokens is not None and max_length > a.max_batch_tokens:
        p.error(f"--max-batch-tokens ({a.max_batch_tokens}) must be at least --max-length ({max_length})")
    for flag in ("max_batch_tokens", "max_queued_tokens", "max_documents", "max_request_bytes"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return Config(
        model=a.model, served_model_name=names or [a.model], host=a.host, http_port=a.http_port,
        grpc_port=a.grpc_port, max_length=max_length, device=a.device, attention=a.attention,
        max_batch_tokens=a.max_batch_tokens, max_queued_tokens=a.max_queued_tokens, batching=not a.no_batching,
        max_documents=a.max_documents, max_request_bytes=a.max_request_bytes,
        shutdown_grace=a.shutdown_grace, log_level=a.log_level.upper(), log_json=a.log_json,
        api_keys=api_keys, metrics_auth=a.metrics_auth, tls_cert=a.tls_cert, tls_key=a.tls_key,
    )
