"""Python client for the rerank service (gRPC ``rerank.v1.Rerank``), plus the ``rerank`` CLI.

Example::

    from rerank_client import RerankClient

    with RerankClient("localhost:50051", timeout=10) as client:
        for r in client.rerank("What is machine learning?", ["ML is a subset of AI.", "It is sunny."]).results:
            print(r.index, r.relevance_score)
"""
__version__ = "0.1.0"

from rerank_client._proto import rerank_pb2 as pb  # the generated messages and stub, for raw calls
from rerank_client._proto import rerank_pb2_grpc as pb_grpc
from rerank_client.client import (
    DEFAULT_MODEL,
    AsyncRerankClient,
    Document,
    RerankClient,
    RerankError,
    RerankResponse,
    RerankResult,
    build_request,
    build_score_request,
    build_service_config,
)

__all__ = ["DEFAULT_MODEL", "AsyncRerankClient", "Document", "RerankClient", "RerankError", "RerankResponse",
           "RerankResult", "build_request", "build_score_request", "build_service_config", "pb", "pb_grpc"]
