"""The REST contract (GUIDE.md section 1, reranking-api.txt) against a live server:
both documented routes, every request field, the response's shape and JSON types, the
token accounting, and the grpc-gateway error body for every kind of bad input."""
from __future__ import annotations

import json
import math
import time

import pytest
import requests
from helpers import DOCS, QUERY, SERVED_MODEL, start_server

from rerank_server.config import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS
from rerank_server.tokenization import PairTokenizer

pytestmark = pytest.mark.serving

ROUTES = ["/v1/rerank", "/rerank"]
ALIAS = "reranker"
MULTILINGUAL = [
    "Kunstmatige intelligentie simuleert menselijke intelligentie.",
    "L'intelligence artificielle simule l'intelligence humaine.",
    "人工智能模拟人类智能。",
    "الذكاء الاصطناعي يحاكي الذكاء البشري.",
    "Искусственный интеллект имитирует человеческий интеллект.",
    "कृत्रिम बुद्धिमत्ता मानव बुद्धि का अनुकरण करती है।",
    "AI 🤖 simulates 🧠 — naïve café, e\u0301, \u00e9, zero\u200bwidth",
]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PairTokenizer(tiny_checkpoint / "tokenizer.json", 8192)


def expected_tokens(tok: PairTokenizer, query: str, docs: list[str]) -> int:
    return sum(len(p) for p in tok.encode_pairs(query, docs))


def post(server, body, route="/v1/rerank", **kwargs) -> requests.Response:
    return requests.post(server.http_url + route, json=body, timeout=60, **kwargs)


def rerank(server, route="/v1/rerank", **fields) -> dict:
    body = {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS, **fields}
    r = post(server, body, route)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    return r.json()


def scores_by_index(data: dict) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in data["results"]}


def assert_sorted(results: list[dict]) -> None:
    for a, b in zip(results, results[1:], strict=False):  # neighbours
        assert a["relevance_score"] >= b["relevance_score"], results
        if a["relevance_score"] == b["relevance_score"]:
            assert a["index"] < b["index"], f"tie not broken by lower index first: {results}"


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------- good requests

def test_health(live_server):
    r = requests.get(live_server.http_url + "/health", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"status": "SERVING"}


def test_batch_budget_defaults_by_device(live_server):
    """No --max-batch-tokens: the CPU budget (a CPU's GEMMs are at full rate well below the
    GPU's budget, so larger CPU batches would only add latency)."""
    info = requests.get(live_server.http_url + "/info", timeout=10).json()
    assert info["device"] == "cpu" and info["max_batch_tokens"] == CPU_BATCH_TOKENS < GPU_BATCH_TOKENS


@pytest.mark.parametrize("route", ROUTES)
def test_response_shape_and_json_types(live_server, tokenizer, route):
    before = int(time.time())
    data = rerank(live_server, route)
    after = int(time.time())
    assert set(data) == {"object", "id", "model", "results", "usage", "created"}
    assert data["object"] == "rerank"
    assert isinstance(data["id"], str) and data["id"].startswith("rerank-") and len(data["id"]) > len("rerank-")
    assert data["model"] == SERVED_MODEL
    assert is_int(data["created"]) and before - 1 <= data["created"] <= after + 1
    results = data["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    for r in results:
        assert set(r) == {"index", "relevance_score"}, "no document unless return_documents"
        assert is_int(r["index"])
        assert isinstance(r["relevance_score"], float)
        assert 0.0 < r["relevance_score"] < 1.0
    assert_sorted(results)
    usage = data["usage"]
    assert set(usage) == {"prompt_tokens", "total_tokens"}
    assert is_int(usage["prompt_tokens"]) and is_int(usage["total_tokens"])
    assert usage["prompt_tokens"] == usage["total_tokens"] == expected_tokens(tokenizer, QUERY, DOCS)


def test_routes_identical(live_server):
    a, b = rerank(live_server, "/v1/rerank"), rerank(live_server, "/rerank")
    assert [r["index"] for r in a["results"]] == [r["index"] for r in b["results"]]
    for x, y in zip(a["results"], b["results"], strict=True):
        assert x["relevance_score"] == pytest.approx(y["relevance_score"], abs=1e-6)
    assert a["usage"] == b["usage"]


def test_ids_unique(live_server):
    ids = [rerank(live_server, ROUTES[i % 2], documents=["a"])["id"] for i in range(8)]
    assert len(set(ids)) == len(ids), ids


@pytest.mark.parametrize("route", ROUTES)
def test_alias_accepted_and_served_id_reported(live_server, route):
    data = rerank(live_server, route, model=ALIAS)
    assert data["model"] == SERVED_MODEL
    full = rerank(live_server, route)
    assert scores_by_index(data) == pytest.approx(scores_by_index(full), abs=1e-6)


@pytest.mark.parametrize("route", ROUTES)
def test_documents_as_strings_objects_and_mixed(live_server, route):
    strings = rerank(live_server, route, return_documents=True)
    objects_sent = [{"text": d} for d in DOCS]
    objects = rerank(live_server, route, documents=objects_sent, return_documents=True)
    mixed_sent = [d if i % 2 else {"text": d} for i, d in enumerate(DOCS)]
    mixed = rerank(live_server, route, documents=mixed_sent, return_documents=True)
    for data, sent in ((strings, DOCS), (objects, objects_sent), (mixed, mixed_sent)):
        assert scores_by_index(data) == pytest.approx(scores_by_index(strings), abs=1e-6)
        for r in data["results"]:
            assert r["document"] == sent[r["index"]]
            assert type(r["document"]) is type(sent[r["index"]])
    assert strings["usage"] == objects["usage"] == mixed["usage"]


@pytest.mark.parametrize("route", ROUTES)
def test_object_document_echoed_exactly(live_server, route):
    sent = [{"text": "Paris is the capital of France.", "title": "geo", "meta": {"tags": ["a", "b"], "ok": True}},
            "a plain string"]
    data = rerank(live_server, route, documents=sent, return_documents=True)
    for r in data["results"]:
        assert r["document"] == sent[r["index"]]


@pytest.mark.parametrize("route", ROUTES)
def test_empty_string_document_is_scored(live_server, tokenizer, route):
    docs = ["", "Machine learning is fun.", ""]
    data = rerank(live_server, route, documents=docs, return_documents=True)
    assert sorted(r["index"] for r in data["results"]) == [0, 1, 2]
    empty = [r for r in data["results"] if r["index"] in (0, 2)]
    assert all(r["document"] == "" and isinstance(r["relevance_score"], float) for r in empty)
    assert data["usage"]["prompt_tokens"] == expected_tokens(tokenizer, QUERY, docs)
    alone = rerank(live_server, route, documents=[""])
    assert alone["results"][0]["relevance_score"] == pytest.approx(empty[0]["relevance_score"], abs=1e-5)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("raw", [False, True])
def test_ties_keep_lower_index_first(live_server, route, raw):
    """Equal scores are listed lower index first (checked on whatever ties the server
    reports; twelve copies of one document are enough to produce exact ties)."""
    docs = ["beta", "alpha"] * 6 + ["gamma"]
    data = rerank(live_server, route, documents=docs, raw_scores=raw, return_documents=True)
    results = data["results"]
    assert_sorted(results)
    scores = [r["relevance_score"] for r in results]
    assert len(set(scores)) < len(scores), "no exact tie produced; the tie rule went unchecked"
    for text in ("alpha", "beta"):
        same = [r["relevance_score"] for r in results if r["document"] == text]
        assert max(same) - min(same) <= 1e-6


def test_duplicate_documents_tie_exactly(live_server):
    docs = ["x", "x"]  # query "What is machine learning?": index 1 scores above index 0 (1 ulp)
    data = rerank(live_server, documents=docs, raw_scores=True, return_documents=True)
    for text in set(docs):
        same = [r for r in data["results"] if r["document"] == text]
        assert len({r["relevance_score"] for r in same}) == 1, same
        assert [r["index"] for r in same] == sorted(r["index"] for r in same), same


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("top_n", [1, 2, len(DOCS), len(DOCS) + 5, 1000])
def test_top_n(live_server, route, top_n):
    full = rerank(live_server, route)
    data = rerank(live_server, route, top_n=top_n)
    assert len(data["results"]) == min(top_n, len(DOCS))
    assert [r["index"] for r in data["results"]] == [r["index"] for r in full["results"]][:top_n]
    assert data["usage"] == full["usage"], "top_n does not change what the model saw"


@pytest.mark.parametrize("route", ROUTES)
def test_top_n_null_means_all(live_server, route):
    assert len(rerank(live_server, route, top_n=None)["results"]) == len(DOCS)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("flag", [None, False])
def test_no_document_unless_requested(live_server, route, flag):
    fields = {} if flag is None else {"return_documents": flag}
    data = rerank(live_server, route, **fields)
    assert all("document" not in r for r in data["results"])


@pytest.mark.parametrize("route", ROUTES)
def test_return_documents_with_top_n(live_server, route):
    data = rerank(live_server, route, top_n=2, return_documents=True)
    assert len(data["results"]) == 2
    for r in data["results"]:
        assert r["document"] == DOCS[r["index"]]


@pytest.mark.parametrize("route", ROUTES)
def test_raw_scores_are_logits(live_server, route):
    normal = rerank(live_server, route)
    raw = rerank(live_server, route, raw_scores=True)
    assert [r["index"] for r in raw["results"]] == [r["index"] for r in normal["results"]]
    logits, probs = scores_by_index(raw), scores_by_index(normal)
    for i, logit in logits.items():
        assert isinstance(logit, float)
        assert sigmoid(logit) == pytest.approx(probs[i], abs=1e-6)
    assert any(not 0.0 <= x <= 1.0 for x in logits.values()) or \
        any(abs(logits[i] - probs[i]) > 1e-3 for i in logits), "raw scores look normalized"
    assert raw["usage"] == normal["usage"]
    explicit = rerank(live_server, route, raw_scores=False)
    assert scores_by_index(explicit) == pytest.approx(probs, abs=1e-6)


@pytest.mark.parametrize("route", ROUTES)
def test_batching_does_not_change_scores(live_server, route):
    docs = DOCS + ["x" * 300, "short", "A somewhat longer document about cats, dogs and other pets. " * 5]
    batch = scores_by_index(rerank(live_server, route, documents=docs, raw_scores=True))
    for i, d in enumerate(docs):
        alone = rerank(live_server, route, documents=[d], raw_scores=True)["results"]
        assert alone[0]["index"] == 0
        assert alone[0]["relevance_score"] == pytest.approx(batch[i], abs=1e-5), (i, d)


@pytest.mark.parametrize("route", ROUTES)
def test_unicode_and_multilingual(live_server, tokenizer, route):
    query = "Wat is kunstmatige intelligentie? 人工智能是什么？"
    data = rerank(live_server, route, query=query, documents=MULTILINGUAL, return_documents=True)
    assert sorted(r["index"] for r in data["results"]) == list(range(len(MULTILINGUAL)))
    for r in data["results"]:
        assert r["document"] == MULTILINGUAL[r["index"]]
        assert math.isfinite(r["relevance_score"])
    assert data["usage"]["prompt_tokens"] == expected_tokens(tokenizer, query, MULTILINGUAL)
    # The same body sent as raw UTF-8 bytes (not \u escapes) is read the same way.
    raw = json.dumps({"model": ALIAS, "query": query, "documents": MULTILINGUAL}, ensure_ascii=False).encode()
    r = requests.post(live_server.http_url + route, data=raw, timeout=60,
                      headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert scores_by_index(r.json()) == pytest.approx(scores_by_index(data), abs=1e-6)


def test_usage_counts_every_pair(live_server, tokenizer):
    docs = ["one", "two words", "a" * 50, "The quick brown fox jumps over the lazy dog. " * 20]
    data = rerank(live_server, documents=docs)
    per_doc = [len(p) for p in tokenizer.encode_pairs(QUERY, docs)]
    assert data["usage"]["prompt_tokens"] == sum(per_doc)
    for d, n in zip(docs, per_doc, strict=True):
        assert rerank(live_server, documents=[d])["usage"]["prompt_tokens"] == n


def test_a_post_without_content_type_is_415(live_server):
    """As TEI does: only application/json is read (a cross-site form cannot send it without a
    preflight; the other form types are refused in test_bad_request_bodies)."""
    body = json.dumps({"model": SERVED_MODEL, "query": QUERY, "documents": DOCS}).encode()
    r = requests.post(live_server.http_url + "/v1/rerank", data=body, timeout=60)
    assert r.status_code == 415, r.text
    assert "Content-Type must be application/json" in r.json()["message"]


# ---------------------------------------------------------------- truncation (--max-length 64)

@pytest.fixture(scope="module")
def short_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "short.log", "--max-length", "64")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def tokenizer64(tiny_checkpoint):
    return PairTokenizer(tiny_checkpoint / "tokenizer.json", 64)


@pytest.mark.slow  # starts a server of its own
def test_truncated_long_document(short_server, tokenizer, tokenizer64):
    tok = tokenizer64
    long_doc = "Machine learning models learn patterns from data and generalize to new examples. " * 30
    assert len(tokenizer.encode_pairs(QUERY, [long_doc])[0]) > 64 * 4  # untruncated, it would be far longer
    docs = ["short one", long_doc, "", long_doc + " and a tail that the model must never see"]
    data = rerank(short_server, documents=docs, raw_scores=True)
    per_doc = [len(p) for p in tok.encode_pairs(QUERY, docs)]
    assert max(per_doc) == 64
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] == sum(per_doc)
    for i, d in enumerate(docs):
        n = rerank(short_server, documents=[d])["usage"]["prompt_tokens"]
        assert n <= 64 and n == per_doc[i]
    s = scores_by_index(data)
    assert s[1] == pytest.approx(s[3], abs=1e-5), "text past the truncation point changed the score"


@pytest.mark.slow  # starts a server of its own
def test_long_query_is_cut(short_server, tokenizer64):
    tok = tokenizer64
    query = "what is the meaning of this extremely long question " * 20
    docs = ["a short answer", "another " * 100]
    data = rerank(short_server, query=query, documents=docs)
    per_doc = [len(p) for p in tok.encode_pairs(query, docs)]
    assert all(n <= 64 for n in per_doc)
    assert data["usage"]["prompt_tokens"] == sum(per_doc)
    assert len(data["results"]) == 2


# ---------------------------------------------------------------- bad requests

def _docs(n):
    return [f"document {i}" for i in range(n)]


GOOD = {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS}


def without(key):
    return {k: v for k, v in GOOD.items() if k != key}


# (id, body, HTTP status, gRPC code, a word the message must contain)
BAD_JSON = [
    ("model-missing", without("model"), 400, 3, "model"),
    ("model-empty", {**GOOD, "model": ""}, 400, 3, "model"),
    ("model-null", {**GOOD, "model": None}, 400, 3, "model"),
    ("model-number", {**GOOD, "model": 7}, 400, 3, "model"),
    ("model-list", {**GOOD, "model": [SERVED_MODEL]}, 400, 3, "model"),
    ("model-unknown", {**GOOD, "model": "some-org/other-model"}, 404, 5, "some-org/other-model"),
    ("model-case", {**GOOD, "model": SERVED_MODEL.lower()}, 404, 5, "model"),
    ("query-missing", without("query"), 400, 3, "query"),
    ("query-empty", {**GOOD, "query": ""}, 400, 3, "query"),
    ("query-number", {**GOOD, "query": 42}, 400, 3, "query"),
    ("query-object", {**GOOD, "query": {"text": "q"}}, 400, 3, "query"),
    ("documents-missing", without("documents"), 400, 3, "documents"),
    ("documents-empty", {**GOOD, "documents": []}, 400, 3, "documents"),
    ("documents-null", {**GOOD, "documents": None}, 400, 3, "documents"),
    ("documents-string", {**GOOD, "documents": "just one string"}, 400, 3, "documents"),
    ("documents-object", {**GOOD, "documents": {"text": "a"}}, 400, 3, "documents"),
    ("document-number", {**GOOD, "documents": ["ok", 3]}, 400, 3, "documents[1]"),
    ("document-null", {**GOOD, "documents": [None]}, 400, 3, "documents[0]"),
    ("document-list", {**GOOD, "documents": ["ok", "ok", ["a"]]}, 400, 3, "documents[2]"),
    ("document-bool", {**GOOD, "documents": [True]}, 400, 3, "documents[0]"),
    ("document-object-no-text", {**GOOD, "documents": [{"content": "a"}]}, 400, 3, "documents[0]"),
    ("document-object-text-number", {**GOOD, "documents": [{"text": 5}]}, 400, 3, "documents[0]"),
    ("top_n-zero", {**GOOD, "top_n": 0}, 400, 3, "top_n"),
    ("top_n-negative", {**GOOD, "top_n": -1}, 400, 3, "top_n"),
    ("top_n-fraction", {**GOOD, "top_n": 1.5}, 400, 3, "top_n"),
    ("top_n-text", {**GOOD, "top_n": "abc"}, 400, 3, "top_n"),
    ("top_n-huge", {**GOOD, "top_n": 10 ** 12}, 400, 3, "top_n"),
    ("return_documents-text", {**GOOD, "return_documents": "yes"}, 400, 3, "return_documents"),
    ("raw_scores-number", {**GOOD, "raw_scores": 2}, 400, 3, "raw_scores"),
    ("too-many-documents", {**GOOD, "documents": _docs(51)}, 400, 3, "50"),
]


def assert_error(r: requests.Response, status: int, code: int, word: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"code", "message", "details"}, body
    assert is_int(body["code"]) and body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    assert word.lower() in body["message"].lower(), f"{word!r} not named in {body['message']!r}"
    assert body["details"] == []
    return body


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name,body,status,code,word", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_request_body(live_server, route, name, body, status, code, word):
    assert_error(post(live_server, body, route), status, code, word)


def test_too_many_documents_names_the_field_and_limit(live_server):
    body = assert_error(post(live_server, {**GOOD, "documents": _docs(51)}), 400, 3, "documents")
    assert "51" in body["message"] and "50" in body["message"]
    assert post(live_server, {**GOOD, "documents": _docs(50)}).status_code == 200


BAD_RAW = [
    ("malformed", b'{"model": "reranker", query: "q"}', "application/json", 400, 3, "JSON"),
    ("truncated", b'{"model": "reranker", "query": "q", "documents": ["a", "b"', "application/json", 400, 3, "JSON"),
    ("empty-body", b"", "application/json", 400, 3, "JSON"),
    ("not-utf8", b'{"model": "\xff\xfe"}', "application/json", 400, 3, "JSON"),
    ("list", json.dumps([GOOD]).encode(), "application/json", 400, 3, "object"),
    ("string", b'"hello"', "application/json", 400, 3, "object"),
    ("number", b"42", "application/json", 400, 3, "object"),
    ("null", b"null", "application/json", 400, 3, "object"),
    ("nested-too-deep", b'{"model": "reranker", "query": "q", "documents": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
     "application/json", 400, 3, "JSON"),
    ("lone-surrogate-query", b'{"model": "reranker", "query": "\\ud800", "documents": ["a"]}', "application/json",
     400, 3, "query"),
    ("lone-surrogate-document", b'{"model": "reranker", "query": "q", "documents": ["\\udc00"]}', "application/json",
     400, 3, "documents"),
    ("text-plain", json.dumps(GOOD).encode(), "text/plain", 415, 3, "Content-Type"),
    ("form", b"model=reranker&query=q", "application/x-www-form-urlencoded", 415, 3, "Content-Type"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name,data,ctype,status,code,word", BAD_RAW, ids=[b[0] for b in BAD_RAW])
def test_bad_raw_body(live_server, route, name, data, ctype, status, code, word):
    r = requests.post(live_server.http_url + route, data=data, headers={"Content-Type": ctype}, timeout=60)
    assert_error(r, status, code, word)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_json_numbers_are_a_400(live_server, constant):
    data = ('{"model": "reranker", "query": "q", "documents": [{"text": "a", "x": ' + constant
            + '}], "return_documents": true}')
    r = requests.post(live_server.http_url + "/v1/rerank", data=data, headers={"Content-Type": "application/json"},
                      timeout=60)
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize("route", ROUTES)
def test_body_over_limit_is_413(live_server, route):
    body = {**GOOD, "documents": ["x" * 100_000, "y" * 100_001]}
    body = assert_error(post(live_server, body, route), 413, 8, "bytes")
    assert "200000" in body["message"]
    # Just under the limit is read (whitespace padding keeps it cheap to score).
    data = json.dumps(GOOD) + " " * (200_000 - len(json.dumps(GOOD)) - 10)
    r = requests.post(live_server.http_url + route, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text


def test_unknown_route_is_404(live_server):
    r = requests.post(live_server.http_url + "/v1/reranking", json=GOOD, timeout=10)
    assert_error(r, 404, 5, "/v1/reranking")
    r = requests.get(live_server.http_url + "/nothing/here", timeout=10)
    assert r.status_code == 404


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method_is_405(live_server, route, method):
    r = requests.request(method, live_server.http_url + route, timeout=10)
    assert r.status_code == 405, r.text
    body = r.json()
    assert set(body) == {"code", "message", "details"} and is_int(body["code"]) and body["message"]


def test_still_serving_after_bad_requests(live_server, tokenizer):
    """Runs after the bad-request tests above (file order): nothing they sent broke the server."""
    assert live_server.process.poll() is None, live_server.log()
    data = rerank(live_server, top_n=2, return_documents=True)
    assert len(data["results"]) == 2
    assert all(r["document"] == DOCS[r["index"]] for r in data["results"])
    assert data["usage"]["prompt_tokens"] == expected_tokens(tokenizer, QUERY, DOCS)
    assert requests.get(live_server.http_url + "/health", timeout=10).json() == {"status": "SERVING"}


def test_grpc_timeout_header_gives_504_and_drops_the_work(live_server):
    """grpc-gateway's deadline header: an exceeded deadline is 504 / DEADLINE_EXCEEDED (4)."""
    body = {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS * 10}
    r = requests.post(live_server.http_url + "/v1/rerank", json=body, headers={"Grpc-Timeout": "1n"}, timeout=30)
    assert r.status_code == 504 and r.json()["code"] == 4 and "Grpc-Timeout" in r.json()["message"]
    r = requests.post(live_server.http_url + "/v1/rerank", json=body, headers={"Grpc-Timeout": "soon"}, timeout=30)
    assert r.status_code == 400 and "Grpc-Timeout" in r.json()["message"]
    r = requests.post(live_server.http_url + "/v1/rerank", json=body, headers={"Grpc-Timeout": "30S"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == len(DOCS) * 10


# ---------------------------------------------------------------- field types, unknown fields

JSON_SAMPLES = {"string": "x", "number": 3, "boolean": True, "null": None, "array": ["x"], "object": {"text": "x"}}
IN_WORDS = {"string": "a string", "number": "a number", "boolean": "a boolean", "array": "an array",
            "object": "an object"}
# dialect -> (its routes, a good body, each field's JSON types, its required fields, its 4xx for a wrong type)
DIALECTS = {
    "rerank": (["/v1/rerank", "/rerank", "/v2/rerank"], GOOD, {
        "model": {"string"}, "query": {"string"}, "documents": {"array"}, "top_n": {"number"},
        "return_documents": {"boolean"}, "raw_scores": {"boolean"}, "rank_fields": {"array"},
        "max_tokens_per_doc": {"number"}, "max_chunks_per_doc": {"number"}, "truncate": {"boolean"},
        "truncation_direction": {"string", "number"}}, {"model", "query", "documents"}, 400),
    "tei": (["/rerank"], {"query": QUERY, "texts": DOCS}, {
        "query": {"string"}, "texts": {"array"}, "raw_scores": {"boolean"}, "return_text": {"boolean"},
        "truncate": {"boolean"}, "truncation_direction": {"string"}, "top_n": {"number"}, "model": {"string"}},
        {"query", "texts"}, 422),
    "score": (["/score", "/v1/score"], {"text_1": QUERY, "text_2": DOCS}, {
        "model": {"string"}, "text_1": {"string", "array"}, "text_2": {"string", "array"}, "raw_scores": {"boolean"},
        "truncate": {"boolean"}}, {"text_1", "text_2"}, 400),
}
# what the protobuf parser says; no error message may carry it
PARSER_WORDS = ["Failed to parse", "RerankRequest", "ScoreRequest", "TeiRerankRequest", "bytes-like", "Message type",
                "ParseError", "Value out of range"]
WRONG_TYPES = [(dialect, route, field, kind) for dialect, (routes, _, fields, _, _) in DIALECTS.items()
               for route in routes for field, kinds in fields.items() for kind in JSON_SAMPLES if kind not in kinds]


def error_message(r: requests.Response) -> str:
    body = r.json()
    return body["error"] if "error_type" in body else body["message"]


@pytest.mark.parametrize("dialect, route, field, kind", WRONG_TYPES, ids=["-".join(c) for c in WRONG_TYPES])
def test_each_wrong_json_type_names_the_field(live_server, dialect, route, field, kind):
    """Every field with every JSON type it does not take: 400 (TEI: 422) naming the field and
    what it got, in plain words. null is absent: a 4xx naming a required field, else a 200."""
    _, good, _, required, status = DIALECTS[dialect]
    r = post(live_server, {**good, field: JSON_SAMPLES[kind]}, route)
    if kind == "null":
        if field not in required:
            assert r.status_code == 200, r.text
            return
        assert 400 <= r.status_code < 500 and field in error_message(r), r.text
    else:
        assert r.status_code == status, r.text
        assert f"{field} must be " in error_message(r) and f"got {IN_WORDS[kind]}" in error_message(r), r.text
    assert not [w for w in PARSER_WORDS if w in error_message(r)], r.text


@pytest.mark.parametrize("body, words", [
    ({**GOOD, "documents": "a"},
     'documents must be an array of strings or of objects with a "text" field; got a string'),
    ({**GOOD, "documents": ["a", 5]}, 'documents[1] must be a string or an object with a "text" field; got a number'),
    ({**GOOD, "query": 5}, "query must be a string; got a number"),
    ({**GOOD, "rank_fields": ["a", 1]}, "rank_fields[1] must be a string; got a number"),
    ({**GOOD, "top_n": 2.5}, "top_n must be an integer; got 2.5"),
    ({**GOOD, "top_n": 2 ** 40}, "top_n must be an integer from -2147483648 to 2147483647"),
    ({**GOOD, "top_n": "2"}, "top_n must be an integer; got a string"),
    ({**GOOD, "truncation_direction": True}, "truncation_direction must be one of"),
    ({**GOOD, "query": "q\ud800"}, "query holds text that is not valid Unicode"),
    ({**GOOD, "documents": [{"text": "a", "\udc00": 1}]}, "documents holds text that is not valid Unicode"),
    ({**GOOD, "documents": [{"text": "a", "deep": json.loads("[" * 80 + "]" * 80)}]}, "documents nests"),
    ({**GOOD, "topN": 2, "top_n": 3}, "top_n is given twice"),
])
def test_error_messages_in_plain_words(live_server, body, words):
    r = post(live_server, body)
    assert r.status_code == 400 and words in r.json()["message"], r.text


def test_score_text_items_are_named(live_server):
    r = post(live_server, {"text_1": QUERY, "text_2": ["a", 5]}, "/score")
    assert r.status_code == 400, r.text
    assert r.json()["message"] == "text_2 must be a string or an array of strings; got an array holding a number"


def test_tei_texts_items_are_named(live_server):
    r = post(live_server, {"query": QUERY, "texts": ["a", None]}, "/rerank")
    assert r.status_code == 422 and r.json() == {"error": "texts[1] must be a string; got null",
                                                 "error_type": "validation"}, r.text


@pytest.mark.parametrize("route, body", [
    ("/v1/rerank", GOOD), ("/rerank", GOOD), ("/v2/rerank", GOOD),
    ("/rerank", {"query": QUERY, "texts": DOCS}), ("/score", {"text_1": QUERY, "text_2": DOCS}),
])
def test_unknown_fields_are_accepted_and_named(live_server, route, body):
    request_id = f"ignored-{route.strip('/').replace('/', '-')}-{len(body)}"
    r = post(live_server, {**body, "topn": 2, "extra": {"a": 1}, "nothing": None}, route,
             headers={"X-Request-Id": request_id})
    assert r.status_code == 200, r.text
    assert r.headers["X-Ignored-Fields"] == "topn, extra, nothing"
    ranked = r.json() if isinstance(r.json(), list) else r.json().get("results", r.json().get("data"))
    assert len(ranked) == len(DOCS)  # topn is not top_n
    assert "X-Ignored-Fields" not in post(live_server, body, route).headers
    # camelCase names are protobuf's JSON mapping, not unknown
    if route == "/v1/rerank":
        r = post(live_server, {**body, "topN": 2, "returnDocuments": True}, route)
        assert len(r.json()["results"]) == 2 and "document" in r.json()["results"][0]
        assert "X-Ignored-Fields" not in r.headers

    def warnings():
        return [line for line in live_server.log().splitlines() if f"[{request_id}]" in line and "WARNING" in line]
    deadline = time.monotonic() + 10
    while not warnings() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(warnings()) == 1 and warnings()[0].endswith("ignored unknown fields: topn, extra, nothing"), warnings()


def test_ignored_field_names_are_escaped(live_server):
    r = post(live_server, {**GOOD, "x\ny": 1, "caf\u00e9": 2})
    assert r.status_code == 200 and r.headers["X-Ignored-Fields"] == "x\\ny, caf\\xe9"
