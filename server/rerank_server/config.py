"""Command-line flags, each also readable from an environment variable RERANK_<FLAG>."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from rerank_server.limits import ConnectionLimits, default_max_connections
from rerank_server.scheduler import MAX_BATCH_PAIRS
from rerank_server.tokenization import check_max_length

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
    document_objects: bool = False  # /v1/rerank and /rerank answer documents as {"text": ...} too
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on the CPU
    cpu_gemm: str = "auto"  # auto: measured at load per GEMM kind; onednn / torch: pinned
    max_request_tokens: int | None = None  # None: see service.default_max_request_tokens
    connection_limits: ConnectionLimits = ConnectionLimits()
    max_connection_age: float = 120.0  # seconds; 0: unlimited (scale-out, issue 23)
    max_connection_age_grace: float = 30.0


class ConfigError(ValueError):
    """A flag or RERANK_* value the server cannot use; the process exits 2 with this one line."""


def env_name(flag: str) -> str:
    """The variable that sets a flag: "max-length" -> "RERANK_MAX_LENGTH"."""
    return "RERANK_" + flag.upper().replace("-", "_")


def _env(flag: str, default):
    return os.environ.get(env_name(flag), default)


def _env_number(flag: str, default, kind=int):
    """RERANK_<FLAG> as a number, or ``default``; a malformed value is a ConfigError naming it."""
    name = env_name(flag)
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None


def _env_flag(flag: str) -> bool:
    value = _env(flag, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{env_name(flag)}={value!r} is not a boolean (true/false, 1/0)")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``rerank-server: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; a default of None is explained in the help text itself."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> Config:
    """-> the Config; a usage error or malformed RERANK_* value exits 2 with one line."""
    p = _Parser(
        prog="rerank-server",
        formatter_class=_HelpFormatter,
        description="Rerank service: gRPC and REST in one process. Every flag can also be set by "
                    "an environment variable RERANK_<FLAG> (e.g. RERANK_HTTP_PORT=8000); a flag wins over "
                    "its variable. `rerank-server checkpoint --help`: write a random-weight checkpoint.")
    try:
        return _parse(p, argv)
    except ConfigError as e:
        p.error(str(e))


def port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


def _parse(p: argparse.ArgumentParser, argv: list[str] | None) -> Config:
    add = p.add_argument
    add("--model", default=_env("model", "BAAI/bge-reranker-v2-m3"),
        help="local checkpoint directory or Hugging Face hub id")
    add("--served-model-name", nargs="+", default=_env("served-model-name", None),
        help="name(s) clients must send as `model`; the first is reported in responses "
             "(default: the --model value). Env: comma-separated")
    add("--host", default=_env("host", "0.0.0.0"), help="address both listeners bind")
    add("--http-port", type=port, default=_env_number("http-port", 8000), help="REST port")
    add("--grpc-port", type=port, default=_env_number("grpc-port", 50051), help="gRPC port")
    add("--max-length", type=int, default=_env_number("max-length", None),
        help="tokens per (query, document) pair after truncation (default: the model's: 8192 for "
             "bge-reranker-v2-m3, 512 for BERT cross-encoders)")
    add("--device", choices=("auto", "cpu", "cuda"), default=_env("device", "auto"),
        help="auto: CUDA when available, else the CPU")
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16", "int8"), default=_env("dtype", "auto"),
        help="weights and activations: auto is float16 on CUDA, float32 on the CPU; bfloat16 on the CPU only "
             "where it is native (AVX512_BF16 or AMX); float16 only on CUDA. Embedding and LayerNorm statistics, "
             "softmax and the classification head stay float32. int8 (CPU with AVX512_VNNI or AMX): the layers' "
             "GEMMs in int8 (weights per output channel at load, activations per row), the rest float32")
    add("--cpu-gemm", choices=("auto", "onednn", "torch"), default=_env("cpu-gemm", "auto"),
        help="CPU GEMM library: auto measures F.linear and oneDNN (weights reordered once) per weight kind at "
             "load and keeps the faster batch-invariant one; onednn or torch pins it, so that replicas and "
             "restarts agree")
    add("--attention", default=_env("attention", None),
        help="force an attention backend (flash-attn, torch-varlen, triton, torch-sdpa) (default: the best available)")
    add("--max-batch-tokens", type=int, default=_env_number("max-batch-tokens", None),
        help=f"real tokens per forward batch, at least --max-length (default: {GPU_BATCH_TOKENS} on a GPU, "
             f"{CPU_BATCH_TOKENS} on the CPU, where larger batches are no faster and only add latency); a batch "
             f"also holds at most {MAX_BATCH_PAIRS:,} pairs (the CUDA grid limit FlashAttention's kernels put the "
             f"batch on)")
    add("--max-queued-tokens", type=int, default=_env_number("max-queued-tokens", 2_000_000),
        help="tokens waiting for the model beyond which new requests get 429 / RESOURCE_EXHAUSTED")
    add("--max-request-tokens", type=int, default=_env_number("max-request-tokens", None),
        help="tokens one request may put in the queue (all its pairs, every chunk counted), at most "
             "--max-queued-tokens; beyond it 413 / RESOURCE_EXHAUSTED naming this flag (default: 32 batches of "
             "--max-batch-tokens, at most a quarter of --max-queued-tokens, at least one pair of --max-length)")
    add("--no-batching", action="store_true", default=_env_flag("no-batching"),
        help="one request per forward (no batching across requests); for comparisons, not for production "
             "(default: batching on)")
    add("--max-documents", type=int, default=_env_number("max-documents", 1000), help="documents per request")
    add("--max-request-bytes", type=int, default=_env_number("max-request-bytes", 16 * 1024 * 1024),
        help="largest REST body / gRPC message accepted (413 / RESOURCE_EXHAUSTED beyond)")
    add("--http-idle-timeout", type=float, default=_env_number("http-idle-timeout", 15.0, float),
        help="seconds a REST connection may go without complete request headers (after it opens or after its "
             "last response) before it is closed: idle keep-alive sockets and slow headers; gRPC closes a "
             "connection without calls after 20 times this")
    add("--http-body-timeout", type=float, default=_env_number("http-body-timeout", 30.0, float),
        help="seconds to receive a REST request body; beyond it 408")
    add("--http-max-connections", type=int, default=_env_number("http-max-connections", None),
        help="REST connections open at once; a new one beyond it closes the one that has waited longest for a "
             "request, or is answered 503 when all are busy (default: a quarter of the "
             "open-file limit, at most 1024)")
    add("--shutdown-grace", type=float, default=_env_number("shutdown-grace", 30.0, float),
        help="seconds to finish accepted requests after SIGTERM/SIGINT; those still running then get "
             "503 / UNAVAILABLE, and the process exits a few seconds later (a second signal: at once)")
    add("--log-level", default=_env("log-level", "INFO"), choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper, help="log verbosity")
    add("--log-json", action="store_true", default=_env_flag("log-json"),
        help="one JSON object per log line (default: plain text)")
    add("--api-key", action="append", default=None,
        help="accepted API key (repeatable; env RERANK_API_KEY, comma-separated). When set, REST needs "
             "'Authorization: Bearer <key>' and gRPC the same 'authorization' metadata; /health stays open "
             "(default: no keys, no auth)")
    add("--metrics-auth", action="store_true", default=_env_flag("metrics-auth"),
        help="put GET /metrics behind the API key too (default: /metrics is open)")
    add("--tls-cert", default=_env("tls-cert", None),
        help="PEM certificate: serve both listeners over TLS (default: plaintext)")
    add("--tls-key", default=_env("tls-key", None), help="PEM private key for --tls-cert (default: none)")
    add("--document-objects", action="store_true", default=_env_flag("document-objects"),
        help='answer string documents as {"text": ...} on /v1/rerank and /rerank too, as /v2/rerank does, for '
             "Cohere v1, Jina and vLLM parsers (default: the string as sent, the seed's shape)")
    _add_scale_out_flags(p)
    a = p.parse_args(argv)
    api_keys = a.api_key or [k.strip() for k in _env("api-key", "").split(",") if k.strip()]
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    for flag in ("tls_cert", "tls_key"):
        path = getattr(a, flag)
        if path and not os.path.isfile(path):
            p.error(f"--{flag.replace('_', '-')} {path}: no such file")
    if a.http_port == a.grpc_port:
        p.error(f"--http-port and --grpc-port are both {a.http_port}")
    names = a.served_model_name
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if a.max_length is not None:
        try:
            check_max_length(a.max_length)  # the model's own limit is checked once it is loaded
        except ValueError as e:
            p.error(str(e))
    if a.max_length is not None and a.max_batch_tokens is not None and a.max_length > a.max_batch_tokens:
        p.error(f"--max-batch-tokens ({a.max_batch_tokens}) must be at least --max-length ({a.max_length})")
    for flag in ("max_batch_tokens", "max_queued_tokens", "max_documents", "max_request_bytes",
                 "max_request_tokens", "http_max_connections"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if a.max_request_tokens is not None and a.max_request_tokens > a.max_queued_tokens:
        p.error(f"--max-request-tokens ({a.max_request_tokens}) must be at most --max-queued-tokens "
                f"({a.max_queued_tokens})")
    for flag in ("http_idle_timeout", "http_body_timeout"):
        if not getattr(a, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    limits = ConnectionLimits(idle_timeout=a.http_idle_timeout, body_timeout=a.http_body_timeout,
                              max_connections=a.http_max_connections or default_max_connections())
    if a.shutdown_grace < 0:
        p.error(f"--shutdown-grace must be >= 0, got {a.shutdown_grace}")
    for flag in ("max_connection_age", "max_connection_age_grace"):
        if getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    return Config(
        model=a.model, served_model_name=names or [a.model], host=a.host, http_port=a.http_port,
        grpc_port=a.grpc_port, max_length=a.max_length, device=a.device, attention=a.attention,
        max_batch_tokens=a.max_batch_tokens, max_queued_tokens=a.max_queued_tokens, batching=not a.no_batching,
        max_documents=a.max_documents, max_request_bytes=a.max_request_bytes,
        shutdown_grace=a.shutdown_grace, log_level=a.log_level, log_json=a.log_json,
        api_keys=api_keys, metrics_auth=a.metrics_auth, tls_cert=a.tls_cert, tls_key=a.tls_key,
        document_objects=a.document_objects, dtype=a.dtype, cpu_gemm=a.cpu_gemm,
        max_request_tokens=a.max_request_tokens, connection_limits=limits,
        max_connection_age=a.max_connection_age, max_connection_age_grace=a.max_connection_age_grace,
    )


def _add_scale_out_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--max-connection-age", type=float, default=_env_number("max-connection-age", 120.0, float),
        help="seconds a gRPC connection lives (+-10%%) before the server asks the client to reconnect "
             "(GOAWAY; no call fails): clients then re-resolve their target and spread onto new replicas. "
             "0: no limit")
    add("--max-connection-age-grace", type=float, default=_env_number("max-connection-age-grace", 30.0, float),
        help="seconds calls in flight on a connection past its age may still take before it is closed")
