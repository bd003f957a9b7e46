"""The generated protobuf/gRPC stubs (``rerank_server._proto``, built from proto/ by CMake
during the package build) and the HTTP bindings read back from their ``google.api.http``
annotations."""
from __future__ import annotations

from importlib import resources

from google.api import annotations_pb2

try:
    from rerank_server._proto import rerank_pb2 as pb
    from rerank_server._proto import rerank_pb2_grpc as pb_grpc
except ImportError as e:  # a source tree used without building the package
    raise ImportError(
        f"the gRPC stubs rerank_server._proto are missing ({e}): install the package, e.g. "
        "`pip install -e .` in the repository (the build runs protoc), or `make test`") from None

__all__ = ["SERVICE", "descriptor_set", "http_bindings", "pb", "pb_grpc"]

SERVICE = pb.DESCRIPTOR.services_by_name["Rerank"]


def descriptor_set() -> bytes:
    """The FileDescriptorSet of rerank.proto with its source info (the comments)."""
    return resources.files("rerank_server._proto").joinpath("rerank.binpb").read_bytes()


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
