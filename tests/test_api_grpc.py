"""The gRPC contract against a live server: the Rerank RPC with the same cases as REST,
REST/gRPC agreement (scores, order, error messages), grpc.health.v1 and reflection,
deadlines and message-size limits."""
from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import requests
from google.protobuf import descriptor_pb2, json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import DOCS, QUERY, ROOT, SERVED_MODEL

from rerank_server.schema import pb, pb_grpc
from rerank_server.tokenization import PairTokenizer

pytestmark = pytest.mark.serving

SERVICE = "rerank.v1.Rerank"


def test_stubs_are_built_from_the_current_proto():
    """An editable install whose .proto changed after the build would serve a stale schema."""
    proto, stub = ROOT / "proto" / "rerank" / "v1" / "rerank.proto", Path(pb.__file__)
    assert stub.stat().st_mtime >= proto.stat().st_mtime, \
        f"{stub} is older than {proto}: rebuild the stubs with `make .venv/.installed` (or `pip install -e .`)"


@pytest.fixture(scope="module")
def channel(live_server):
    with grpc.insecure_channel(live_server.grpc_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.RerankStub(channel)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PairTokenizer(tiny_checkpoint / "tokenizer.json", 8192)


def value(doc) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if isinstance(doc, dict):
        v.struct_value.update(doc)
    else:
        v.string_value = doc
    return v


def request(documents=DOCS, **fields) -> pb.RerankRequest:
    fields = {"model": SERVED_MODEL, "query": QUERY, **fields}
    return pb.RerankRequest(documents=[value(d) for d in documents], **fields)


def call(stub, req=None, **fields) -> pb.RerankResponse:
    return stub.Rerank(req if req is not None else request(**fields), timeout=60)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_response_fields(stub, tokenizer):
    reply = call(stub)
    assert reply.object == "rerank"
    assert reply.id.startswith("rerank-") and len(reply.id) > len("rerank-")
    assert reply.model == SERVED_MODEL
    assert reply.created > 1_600_000_000
    assert sorted(r.index for r in reply.results) == list(range(len(DOCS)))
    for r in reply.results:
        assert 0.0 < r.relevance_score < 1.0
        assert not r.HasField("document")
    scores = [r.relevance_score for r in reply.results]
    assert scores == sorted(scores, reverse=True)
    expected = sum(len(p) for p in tokenizer.encode_pairs(QUERY, DOCS))
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == expected
    assert call(stub).id != reply.id


def test_alias(stub):
    assert call(stub, model="reranker").model == SERVED_MODEL


@pytest.mark.parametrize("top_n", [1, 3, len(DOCS), 99])
def test_top_n(stub, top_n):
    full = [r.index for r in call(stub).results]
    reply = call(stub, top_n=top_n)
    assert [r.index for r in reply.results] == full[:top_n]


def test_return_documents_string_and_struct(stub):
    docs = [DOCS[0], {"text": DOCS[1], "source": "wiki", "rank": 3}, DOCS[2], {"text": ""}]
    reply = call(stub, documents=docs, return_documents=True)
    assert len(reply.results) == len(docs)
    for r in reply.results:
        assert r.HasField("document")
        sent = docs[r.index]
        if isinstance(sent, str):
            assert r.document.WhichOneof("kind") == "string_value" and r.document.string_value == sent
        else:
            assert r.document.WhichOneof("kind") == "struct_value"
            assert json_format.MessageToDict(r.document.struct_value) == sent
    plain = call(stub, documents=[d if isinstance(d, str) else d["text"] for d in docs])
    assert {r.index: r.relevance_score for r in reply.results} == \
        pytest.approx({r.index: r.relevance_score for r in plain.results}, abs=1e-6)
    assert all(not r.HasField("document") for r in call(stub, return_documents=False).results)


def test_raw_scores(stub):
    normal = {r.index: r.relevance_score for r in call(stub).results}
    raw = call(stub, raw_scores=True)
    assert [r.index for r in raw.results] == sorted(normal, key=lambda i: (-normal[i], i))
    for r in raw.results:
        assert sigmoid(r.relevance_score) == pytest.approx(normal[r.index], abs=1e-6)


def test_empty_document_and_unicode(stub, tokenizer):
    docs = ["", "人工智能模拟人类智能。", "Kunstmatige intelligentie 🤖", "الذكاء الاصطناعي"]
    reply = call(stub, documents=docs, return_documents=True)
    assert {r.index: r.document.string_value for r in reply.results} == dict(enumerate(docs))
    assert reply.usage.prompt_tokens == sum(len(p) for p in tokenizer.encode_pairs(QUERY, docs))


@pytest.mark.parametrize("fields", [{}, {"top_n": 2}, {"raw_scores": True}, {"return_documents": True},
                                    {"top_n": 3, "raw_scores": True, "return_documents": True}])
def test_rest_and_grpc_agree(live_server, stub, fields):
    docs = DOCS + [{"text": "Neural networks are used in AI."}, ""]
    body = {"model": SERVED_MODEL, "query": QUERY, "documents": docs, **fields}
    rest = requests.post(live_server.http_url + "/v1/rerank", json=body, timeout=60).json()
    reply = json_format.MessageToDict(call(stub, documents=docs, **fields), preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
    assert [r["index"] for r in reply["results"]] == [r["index"] for r in rest["results"]]
    for g, h in zip(reply["results"], rest["results"], strict=True):
        assert g["relevance_score"] == pytest.approx(h["relevance_score"], abs=1e-6)
        assert g.get("document") == h.get("document")
    assert reply["usage"] == rest["usage"]
    assert reply["model"] == rest["model"] and reply["object"] == rest["object"]


# (id, REST body, gRPC request, gRPC status)
BASE = {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS}
BAD = [
    ("model-missing", {k: v for k, v in BASE.items() if k != "model"}, request(model=""),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("model-unknown", {**BASE, "model": "nope/nope"}, request(model="nope/nope"), grpc.StatusCode.NOT_FOUND),
    ("query-empty", {**BASE, "query": ""}, request(query=""), grpc.StatusCode.INVALID_ARGUMENT),
    ("documents-empty", {**BASE, "documents": []}, request(documents=[]), grpc.StatusCode.INVALID_ARGUMENT),
    ("documents-51", {**BASE, "documents": ["d"] * 51}, request(documents=["d"] * 51),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("document-number", {**BASE, "documents": ["a", 1.5]},
     pb.RerankRequest(model=SERVED_MODEL, query=QUERY, documents=[value("a"), struct_pb2.Value(number_value=1.5)]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("document-null", {**BASE, "documents": ["a", "b", None]},
     pb.RerankRequest(model=SERVED_MODEL, query=QUERY,
                      documents=[value("a"), value("b"), struct_pb2.Value(null_value=0)]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("document-list", {**BASE, "documents": [["a"]]},
     json_format.ParseDict({**BASE, "documents": [["a"]]}, pb.RerankRequest()), grpc.StatusCode.INVALID_ARGUMENT),
    ("document-no-text", {**BASE, "documents": [{"body": "a"}]}, request(documents=[{"body": "a"}]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("document-unset", None, pb.RerankRequest(model=SERVED_MODEL, query=QUERY, documents=[struct_pb2.Value()]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("top_n-zero", {**BASE, "top_n": 0}, request(top_n=0), grpc.StatusCode.INVALID_ARGUMENT),
    ("top_n-negative", {**BASE, "top_n": -1}, request(top_n=-1), grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("name,body,req,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_maps_to_status_with_rest_message(live_server, stub, name, body, req, status):
    with pytest.raises(grpc.RpcError) as e:
        stub.Rerank(req, timeout=30)
    assert e.value.code() == status, e.value.details()
    assert e.value.details()
    if body is not None:
        rest = requests.post(live_server.http_url + "/v1/rerank", json=body, timeout=30)
        assert rest.json()["code"] == status.value[0]
        assert e.value.details() == rest.json()["message"]
    else:
        assert "documents[0]" in e.value.details()


def test_message_over_limit_is_resource_exhausted(stub):
    with pytest.raises(grpc.RpcError) as e:
        call(stub, documents=["x" * 150_000, "y" * 60_000])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_exceeded_then_still_serving(stub):
    big = request(documents=[("token " * 200) + str(i) for i in range(50)])
    with pytest.raises(grpc.RpcError) as e:
        stub.Rerank(big, timeout=0.0001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # A deadline that expires while the server works on it (the forward takes longer than 1 ms).
    with pytest.raises(grpc.RpcError) as e:
        stub.Rerank(big, timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    reply = call(stub, top_n=1)
    assert len(reply.results) == 1
    assert len(call(stub, big).results) == 50


def test_health_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _reflect(channel, **query) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**query)]), timeout=10))
    assert len(replies) == 1
    return replies[0]


def test_reflection_lists_services(channel):
    reply = _reflect(channel, list_services="")
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_reflection_returns_the_file_descriptor(channel):
    reply = _reflect(channel, file_containing_symbol=SERVICE)
    assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in reply.file_descriptor_response.file_descriptor_proto]
    rerank_file = next(f for f in files if f.package == "rerank.v1")
    assert rerank_file.name == "rerank/v1/rerank.proto"
    service = next(s for s in rerank_file.service if s.name == "Rerank")
    method = next(m for m in service.method if m.name == "Rerank")
    assert method.input_type == ".rerank.v1.RerankRequest" and method.output_type == ".rerank.v1.RerankResponse"
    assert {m.name for m in rerank_file.message_type} >= {"RerankRequest", "RerankResponse", "RerankResult", "Usage"}
    missing = _reflect(channel, file_containing_symbol="no.such.Symbol")
    assert missing.WhichOneof("message_response") == "error_response"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
