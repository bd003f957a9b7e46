"""Prometheus metrics (served at GET /metrics), one registry per server."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series only add noise for a long-running server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        # code: the gRPC status name on both transports (OK, INVALID_ARGUMENT, ...); http_status:
        # the HTTP status beside it on REST ("" on gRPC). Health, metrics and docs probes are not counted.
        self.requests = Counter("rerank_requests", "Rerank requests by transport, route and gRPC status code",
                                ["transport", "route", "code", "http_status"], registry=r)
        self.stage_seconds = Histogram("rerank_stage_seconds", "Time per request stage",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("rerank_request_seconds", "Whole request latency",
                                         ["transport"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_pairs = Histogram("rerank_batch_pairs", "Pairs per forward batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.batch_tokens = Histogram("rerank_batch_tokens", "Real (unpadded) tokens per forward batch",
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536), registry=r)
        self.queued_tokens = Gauge("rerank_queued_tokens", "Tokens waiting for the model", registry=r)
        self.tokens = Counter("rerank_tokens", "Tokens processed by the model", registry=r)
        # LLM rerankers: pair tokens not computed because a shared prefix (instruction + query) was
        # computed once for the pairs of a batch (usage still counts every pair's tokens)
        self.shared_prefix_tokens = Counter("rerank_shared_prefix_tokens",
                                            "Pair tokens spared by computing a shared prefix once", registry=r)

    def observe_batch(self, pairs: int, tokens: int) -> None:
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(tokens)
        self.tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
