"""The generated protobuf/gRPC stubs (built from proto/ by CMake into server/gen) and the
HTTP bindings read back from their ``google.api.http`` annotations."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "rerank" / "v1" / "rerank.proto"
GENERATED = Path(__file__).resolve().parent / "gen"


def _check_fresh() -> None:
    stub = GENERATED / "rerank" / "v1" / "rerank_pb2.py"
    if not stub.exists() or (PROTO.exists() and stub.stat().st_mtime < PROTO.stat().st_mtime):
        raise ImportError(f"{stub} is missing or older than {PROTO}: run `make proto` (CMake target `proto`)")


_check_fresh()
# protoc emits absolute imports (`from rerank.v1 import rerank_pb2`), rooted at server/gen.
sys.path.insert(0, str(GENERATED))

from google.api import annotations_pb2  # noqa: E402
from rerank.v1 import rerank_pb2 as pb  # noqa: E402
from rerank.v1 import rerank_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = pb.DESCRIPTOR.services_by_name["Rerank"]


def http_bindings(service=SERVICE) -> list[tuple[str, str, object]]:
    """(HTTP method, path, method descriptor) for every google.api.http binding of ``service``."""
    bindings = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule = options.Extensions[annotations_pb2.http]
        for r in [rule, *rule.additional_bindings]:
            verb = r.WhichOneof("pattern")
            if r.body != "*":
                raise ValueError(f"{method.full_name}: only body: \"*\" bindings are supported")
            bindings.append((verb.upper(), getattr(r, verb), method))
    return bindings
