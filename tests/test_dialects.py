"""The dialects beside the seed's: TEI on POST /rerank, document objects (Cohere v2 and
--document-objects), vLLM's pair scoring (/score, /v1/score and the Score RPC), and the
transport details the issue lists (405 Allow, deadlines after validation, plain units)."""
from __future__ import annotations

import math

import grpc
import pytest
import requests
from google.protobuf import struct_pb2
from helpers import DOCS, QUERY, SERVED_MODEL, start_server

from rerank_server.schema import pb, pb_grpc
from rerank_server.tokenization import PairTokenizer

pytestmark = [pytest.mark.serving, pytest.mark.slow]

MAX_LENGTH = 64
LONG = "Deep learning uses neural networks with multiple layers. " * 20  # far over 64 tokens


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """--max-length 64 (so truncation shows), 8 documents at most."""
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("dialects") / "server.log",
                          "--max-length", str(MAX_LENGTH), "--max-documents", "8")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def objects_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("objects") / "server.log",
                          env={"RERANK_DOCUMENT_OBJECTS": "1"})
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PairTokenizer(tiny_checkpoint / "tokenizer.json", MAX_LENGTH)


def post(server, path, body, **kwargs) -> requests.Response:
    return requests.post(server.http_url + path, json=body, timeout=60, **kwargs)


def rerank_scores(server, documents, **fields) -> dict[int, float]:
    r = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": documents, **fields})
    assert r.status_code == 200, r.text
    return {x["index"]: x["relevance_score"] for x in r.json()["results"]}


# ---------------------------------------------------------------- TEI


def test_tei_minimal_body_gets_a_bare_sorted_array(server):
    r = post(server, "/rerank", {"query": QUERY, "texts": DOCS})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert isinstance(ranks, list) and len(ranks) == len(DOCS)
    assert all(set(x) == {"index", "score"} for x in ranks)
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    # the same engine and validation as the Cohere dialect: identical scores
    assert {x["index"]: x["score"] for x in ranks} == rerank_scores(server, DOCS)
    assert int(r.headers["X-Compute-Tokens"]) > 0 and float(r.headers["X-Inference-Time"]) >= 0


def test_tei_every_knob(server):
    body = {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True, "truncate": True,
            "truncation_direction": "Right", "top_n": 2, "model": "reranker"}
    ranks = post(server, "/rerank", body).json()
    assert len(ranks) == 2 and all(x["text"] == DOCS[x["index"]] for x in ranks)
    raw = rerank_scores(server, DOCS, raw_scores=True)
    assert [x["score"] for x in ranks] == sorted(raw.values(), reverse=True)[:2]
    assert {x["index"]: x["score"] for x in ranks} == {i: raw[i] for i in (x["index"] for x in ranks)}


@pytest.mark.parametrize("direction", ["left", "LEFT", "Left"])
def test_tei_left_truncation_keeps_the_end(server, tokenizer, direction):
    text = "start words here. " + LONG + " the very end"
    left = post(server, "/rerank", {"query": QUERY, "texts": [text], "truncation_direction": direction,
                                    "raw_scores": True}).json()[0]["score"]
    right = post(server, "/rerank", {"query": QUERY, "texts": [text], "raw_scores": True}).json()[0]["score"]
    # what left truncation means: the pair ends with the document's last tokens
    [pair_right] = tokenizer.encode_pairs(QUERY, [text])
    pairs_left, _ = tokenizer.encode_chunked(QUERY, [text], keep_end=True)
    doc_ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    assert pairs_left[0][-len(doc_ids[-10:]) - 1:-1] == doc_ids[-10:]
    assert pair_right[-11:-1] != doc_ids[-10:]
    assert left != right
    assert rerank_scores(server, [text], raw_scores=True, truncation_direction="LEFT")[0] == left


def test_tei_truncate_false_refuses_a_long_pair(server):
    r = post(server, "/rerank", {"query": QUERY, "texts": ["short", LONG], "truncate": False})
    assert r.status_code == 413, r.text
    assert r.json()["error_type"] == "validation" and "document 1" in r.json()["error"]
    assert str(MAX_LENGTH) in r.json()["error"]
    assert post(server, "/rerank", {"query": QUERY, "texts": ["short"], "truncate": False}).status_code == 200
    # the same knob in the Cohere dialect, in its own error shape
    r = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": [LONG], "truncate": False})
    assert r.status_code == 413 and r.json()["code"] == 3 and "--max-length" in r.json()["message"]


@pytest.mark.parametrize("body, status, error_type, word", [
    ({"query": QUERY, "texts": []}, 400, "empty", "texts"),
    ({"query": QUERY, "texts": ["a"] * 9}, 413, "validation", "limit is 8"),
    ({"query": QUERY, "texts": ["a"], "model": "nope"}, 404, "validation", "nope"),
    ({"query": "", "texts": ["a"]}, 422, "validation", "query"),
    ({"query": QUERY, "texts": [1]}, 422, "validation", "texts"),
    ({"query": QUERY, "texts": ["a"], "top_n": 0}, 422, "validation", "top_n"),
    ({"query": QUERY, "texts": ["a"], "top_n": "2"}, 422, "validation", "top_n"),
    ({"query": QUERY, "texts": ["a"], "truncation_direction": "middle"}, 422, "validation", "truncation_direction"),
])
def test_tei_errors_in_tei_shape(server, body, status, error_type, word):
    r = post(server, "/rerank", body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"}
    assert r.json()["error_type"] == error_type and word in r.json()["error"]


def test_tei_is_only_recognised_on_rerank_without_documents(server):
    # documents present: the Cohere dialect, texts ignored
    r = post(server, "/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS, "texts": ["x"]})
    assert r.status_code == 200 and r.json()["object"] == "rerank" and len(r.json()["results"]) == len(DOCS)
    # texts on /v1/rerank is not TEI: documents is missing
    r = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "texts": DOCS})
    assert r.status_code == 400 and "documents" in r.json()["message"]


# ---------------------------------------------------------------- document objects


def test_v2_returns_string_documents_as_objects(server):
    docs = ["plain", {"text": "obj", "id": 7, "meta": {"n": [1, 2.5, None, True]}}]
    body = {"model": SERVED_MODEL, "query": QUERY, "documents": docs, "return_documents": True}
    v2 = post(server, "/v2/rerank", body).json()["results"]
    assert {x["index"]: x["document"] for x in v2} == {0: {"text": "plain"}, 1: docs[1]}
    assert isinstance(next(x for x in v2 if x["index"] == 1)["document"]["id"], int)  # 7, not 7.0
    for path in ("/v1/rerank", "/rerank"):  # the seed's shape by default
        results = post(server, path, body).json()["results"]
        assert {x["index"]: x["document"] for x in results} == {0: "plain", 1: docs[1]}
        raw = requests.post(server.http_url + path, json=body, timeout=60).text
        assert '"id": 7,' in raw or '"id":7,' in raw


def test_document_objects_flag(objects_server):
    body = {"model": SERVED_MODEL, "query": QUERY, "documents": ["plain", {"text": "t", "id": 7}],
            "return_documents": True}
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        results = post(objects_server, path, body).json()["results"]
        assert {x["index"]: x["document"] for x in results} == {0: {"text": "plain"}, 1: {"text": "t", "id": 7}}
    # the TEI dialect keeps TEI's own shape
    ranks = post(objects_server, "/rerank", {"query": QUERY, "texts": ["plain"], "return_text": True}).json()
    assert ranks[0]["text"] == "plain"
    assert requests.get(objects_server.http_url + "/info", timeout=10).json()["document_objects"] is True


# ---------------------------------------------------------------- pair scoring


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score_one_to_many(server, path):
    r = post(server, path, {"model": SERVED_MODEL, "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"id", "object", "created", "model", "data", "usage"}
    assert data["model"] == SERVED_MODEL and data["id"].startswith("score-") and isinstance(data["created"], int)
    assert [x["index"] for x in data["data"]] == list(range(len(DOCS)))  # request order, not sorted
    assert all(x["object"] == "score" for x in data["data"])
    expected = rerank_scores(server, DOCS)
    assert [x["score"] for x in data["data"]] == [expected[i] for i in range(len(DOCS))]
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] > 0


def test_score_pairwise_and_broadcast(server):
    queries = [QUERY, "What is the weather?", QUERY]
    docs = DOCS[:3]
    pairwise = post(server, "/score", {"text_1": queries, "text_2": docs}).json()["data"]
    for i, (q, d) in enumerate(zip(queries, docs, strict=True)):
        alone = post(server, "/score", {"text_1": q, "text_2": d}).json()["data"]
        assert alone == [{"index": 0, "object": "score", "score": pairwise[i]["score"]}]
    broadcast = post(server, "/score", {"text_1": [QUERY], "text_2": docs}).json()["data"]
    assert [x["score"] for x in broadcast] == [rerank_scores(server, docs)[i] for i in range(3)]
    raw = post(server, "/score", {"text_1": QUERY, "text_2": docs, "raw_scores": True}).json()["data"]
    assert [1 / (1 + math.exp(-x["score"])) for x in raw] == pytest.approx([x["score"] for x in broadcast], abs=1e-12)


@pytest.mark.parametrize("body, word", [
    ({"text_1": ["a", "b"], "text_2": ["x", "y", "z"]}, "text_1"),
    ({"text_1": "a"}, "text_2"),
    ({"text_1": "a", "text_2": []}, "text_2"),
    ({"text_1": "", "text_2": ["x"]}, "text_1"),
    ({"text_1": "a", "text_2": [1]}, "text_2"),
    ({"text_1": "a", "text_2": ["x"] * 9}, "limit is 8"),
    ({"model": "nope", "text_1": "a", "text_2": ["x"]}, "nope"),
])
def test_score_errors_name_the_field(server, body, word):
    r = post(server, "/score", body)
    assert 400 <= r.status_code < 500 and word in r.json()["message"], r.text


def test_score_rpc(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.RerankStub(channel)
        text_2 = struct_pb2.Value()
        text_2.list_value.values.add(string_value=DOCS[0])
        text_2.list_value.values.add(string_value=DOCS[1])
        reply = stub.Score(pb.ScoreRequest(text_1=struct_pb2.Value(string_value=QUERY), text_2=text_2), timeout=60)
        rest = post(server, "/v1/score", {"text_1": QUERY, "text_2": DOCS[:2]}).json()
        assert [d.score for d in reply.data] == [d["score"] for d in rest["data"]]
        assert reply.usage.prompt_tokens == rest["usage"]["prompt_tokens"]
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(pb.ScoreRequest(text_1=struct_pb2.Value(string_value=QUERY)), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text_2" in e.value.details()


# ---------------------------------------------------------------- transport details


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/score", "/v1/score"])
def test_405_carries_allow(server, path):
    r = requests.get(server.http_url + path, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST", r.headers


def test_body_is_validated_before_the_deadline_counts(server):
    r = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": "", "documents": DOCS},
             headers={"Grpc-Timeout": "1n"})
    assert r.status_code == 400 and "query" in r.json()["message"]
    r = post(server, "/rerank", {"query": QUERY, "texts": []}, headers={"Grpc-Timeout": "1n"})
    assert r.status_code == 400 and r.json()["error_type"] == "empty"


@pytest.mark.parametrize("header, said", [("1n", "1 ns"), ("1u", "1 µs"), ("00000001n", "1 ns")])
def test_deadline_errors_say_plain_units(server, header, said):
    """A deadline that truly expires (1 ns) is 504 DEADLINE_EXCEEDED, its length in plain units."""
    body = {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS}
    r = post(server, "/v1/rerank", body, headers={"Grpc-Timeout": header})
    assert r.status_code == 504 and r.json()["code"] == 4, r.text
    assert f"({said})" in r.json()["message"]
    r = post(server, "/score", {"text_1": QUERY, "text_2": DOCS}, headers={"Grpc-Timeout": header})
    assert r.status_code == 504 and f"({said})" in r.json()["message"]


@pytest.mark.parametrize("header", ["0S", "0m", "0M", "00000000H", "123456789S", "5", "S", "5s", "5x", "-1S", "1.5S",
                                    "+5S", "1 S", "0x5S"])
@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/score", "/v1/score"])
def test_malformed_grpc_timeout_is_invalid_argument(server, header, path):
    """gRPC's TimeoutValue: 1 to 8 digits, positive, a unit of H M S m u n; else 400 naming the header."""
    body = {"text_1": QUERY, "text_2": DOCS} if "score" in path else {"model": SERVED_MODEL, "query": QUERY,
                                                                      "documents": DOCS}
    r = post(server, path, body, headers={"Grpc-Timeout": header})
    assert r.status_code == 400 and r.json()["code"] == 3 and "Grpc-Timeout" in r.json()["message"], r.text
    assert repr(header) in r.json()["message"]
