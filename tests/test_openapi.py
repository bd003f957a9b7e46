"""GET /openapi.json describes what the server really accepts and returns: live responses,
good and bad, validate against it, its routes are exactly the server's, and the limits the
server enforces (served names, --max-documents, minimums, document shapes, Grpc-Timeout)
are in it. (schemathesis, in test_schemathesis.py, checks the same far more widely.)"""
import re

import jsonschema
import pytest
import requests
from helpers import SERVED_MODEL

from rerank_server.rest import grpc_timeout
from rerank_server.service import ApiError

pytestmark = pytest.mark.serving

MAX_DOCUMENTS = 50  # the live_server fixture's --max-documents


@pytest.fixture(scope="module")
def spec(live_server):
    response = requests.get(live_server.http_url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


def validator(spec, schema) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "components": spec["components"]})


def request_schema(spec, path):
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def response_schema(spec, path, status="200"):
    return spec["paths"][path]["post"]["responses"][status]["content"]["application/json"]["schema"]


RERANK_PATHS = ["/v1/rerank", "/rerank", "/v2/rerank"]
GOOD = [
    {"query": "q", "documents": ["a", "b", ""]},
    {"query": "q", "documents": ["a", {"text": "b", "id": 7}], "return_documents": True, "top_n": 1},
    {"query": "q", "documents": ["a " * 300], "raw_scores": True, "max_chunks_per_doc": 4, "max_tokens_per_doc": 50},
    {"query": "q", "documents": [{"title": "t", "text": "x"}], "rank_fields": ["title"], "return_documents": True},
    {"query": "q", "documents": [{"title": "t"}], "rank_fields": ["title", "nothing"], "top_n": None},
    {"query": "q", "documents": ["a"], "truncation_direction": "LEFT", "truncate": True},
]
BAD = [
    ({"query": "q", "documents": []}, 400),
    ({"model": "nope", "query": "q", "documents": ["a"]}, 404),
    ({"query": "", "documents": ["a"]}, 400),
    ({"query": "q", "documents": ["a"], "top_n": 0}, 400),
    ({"query": "q", "documents": ["a"], "top_n": "2"}, 400),
    ({"query": "q", "documents": [5]}, 400),
    ({"query": "q", "documents": [{"title": "t"}]}, 400),  # no text and no rank_fields
    ({"query": "q", "documents": ["a"] * (MAX_DOCUMENTS + 1)}, 400),
    ({"query": "q", "documents": ["a"] * 2, "max_chunks_per_doc": 5001}, 400),
    ({"query": "q", "documents": ["a"], "truncation_direction": "MIDDLE"}, 400),
]


@pytest.mark.parametrize("body", GOOD)
@pytest.mark.parametrize("path", RERANK_PATHS)
def test_good_requests_and_responses_match_the_document(spec, live_server, body, path):
    body = {"model": SERVED_MODEL, **body}
    assert validator(spec, request_schema(spec, path)).is_valid(body)
    response = requests.post(live_server.http_url + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    validator(spec, response_schema(spec, path)).validate(response.json())
    assert response.headers["X-Compute-Tokens"].isdigit()


@pytest.mark.parametrize("body, status", BAD)
def test_bad_requests_are_invalid_by_the_document_and_refused(spec, live_server, body, status):
    body = {"model": SERVED_MODEL, **body}
    assert not validator(spec, request_schema(spec, "/v1/rerank")).is_valid(body)
    response = requests.post(live_server.http_url + "/v1/rerank", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert str(status) in spec["paths"]["/v1/rerank"]["post"]["responses"]
    validator(spec, response_schema(spec, "/v1/rerank", str(status))).validate(response.json())


def test_tei_dialect_is_described_on_rerank(spec, live_server):
    body = {"query": "q", "texts": ["a", "b"], "truncation_direction": "Left", "return_text": True}
    assert validator(spec, request_schema(spec, "/rerank")).is_valid(body)
    assert not validator(spec, request_schema(spec, "/v1/rerank")).is_valid(body)
    response = requests.post(live_server.http_url + "/rerank", json=body, timeout=30)
    assert response.status_code == 200 and isinstance(response.json(), list)
    validator(spec, response_schema(spec, "/rerank")).validate(response.json())
    bad = {"query": "q", "texts": []}
    assert not validator(spec, request_schema(spec, "/rerank")).is_valid(bad)
    response = requests.post(live_server.http_url + "/rerank", json=bad, timeout=30)
    assert response.status_code == 400
    validator(spec, response_schema(spec, "/rerank", "400")).validate(response.json())
    assert {"422", "424"} <= set(spec["paths"]["/rerank"]["post"]["responses"])


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score_is_described(spec, live_server, path):
    for body in ({"text_1": "q", "text_2": ["a", "b"]}, {"text_1": ["q", "r"], "text_2": ["a", "b"]},
                 {"model": "reranker", "text_1": ["q"], "text_2": "a"}):
        assert validator(spec, request_schema(spec, path)).is_valid(body)
        response = requests.post(live_server.http_url + path, json=body, timeout=30)
        assert response.status_code == 200, response.text
        validator(spec, response_schema(spec, path)).validate(response.json())
    for body in ({"text_1": ["q", "r"], "text_2": ["a", "b", "c"]}, {"text_1": "", "text_2": ["a"]},
                 {"text_1": "q", "text_2": []}):
        assert not validator(spec, request_schema(spec, path)).is_valid(body)
        assert requests.post(live_server.http_url + path, json=body, timeout=30).status_code == 400


def test_limits_are_in_the_document(spec):
    request = spec["components"]["schemas"]["RerankRequest"]
    fields = request["properties"]
    assert request["required"] == ["model", "query", "documents"]
    assert fields["model"]["enum"] == [SERVED_MODEL, "reranker"]
    assert fields["query"]["minLength"] == 1
    assert (fields["documents"]["minItems"], fields["documents"]["maxItems"]) == (1, MAX_DOCUMENTS)
    for name in ("top_n", "max_tokens_per_doc", "max_chunks_per_doc"):
        assert fields[name]["anyOf"][0]["minimum"] == 1  # or null: absent
    assert "documents x max_chunks_per_doc" in request["description"]
    tei = spec["components"]["schemas"]["TeiRerankRequest"]["properties"]
    assert tei["texts"]["maxItems"] == MAX_DOCUMENTS and tei["model"]["anyOf"][0]["enum"] == [SERVED_MODEL, "reranker"]


TIMEOUTS = ["1n", "1S", "00000001n", "99999999H", "10M", "500m", "7u", "0S", "00000000S", "0n", "123456789S",
            "5", "S", "5x", "5s", "-1S", "1.5S", "+5S", "1 S", ""]


def test_grpc_timeout_pattern_is_what_the_server_accepts(spec):
    """gRPC's TimeoutValue: 1 to 8 digits, positive, a unit of H M S m u n."""
    timeout = next(p for p in spec["paths"]["/v1/rerank"]["post"]["parameters"] if p["name"] == "Grpc-Timeout")
    pattern = timeout["schema"]["pattern"]
    for value in TIMEOUTS:
        try:
            grpc_timeout(value)
            accepted = True
        except ApiError as e:
            accepted = False
            assert "Grpc-Timeout" in e.message
        assert bool(re.search(pattern, value)) == accepted, (value, accepted, pattern)
        assert accepted == (value in TIMEOUTS[:7]), value


def test_request_schema_requires_what_the_server_requires(spec, live_server):
    for field in spec["components"]["schemas"]["RerankRequest"]["required"]:
        body = {"model": SERVED_MODEL, "query": "q", "documents": ["a"]}
        del body[field]
        response = requests.post(live_server.http_url + "/v1/rerank", json=body, timeout=10)
        assert response.status_code == 400 and field in response.json()["message"]


def test_documented_routes_are_the_served_routes(spec, live_server):
    assert {"/v1/rerank", "/rerank", "/v2/rerank", "/score", "/v1/score"} <= set(spec["paths"])
    bodies = {"Rerank": {"model": SERVED_MODEL, "query": "q", "documents": ["a"]},
              "Score": {"text_1": "q", "text_2": ["a"]}}
    for path, ops in spec["paths"].items():
        for verb, op in ops.items():
            body = next((b for name, b in bodies.items() if op["operationId"].startswith(name)), None)
            response = requests.request(verb, live_server.http_url + path, json=body, timeout=10)
            assert response.status_code == 200, (verb, path, response.text)
    # descriptions come from the proto's comments
    assert "sigmoid" in spec["components"]["schemas"]["RerankResult"]["properties"]["relevance_score"]["description"]


def test_docs_page_lists_routes_and_fields(live_server):
    page = requests.get(live_server.http_url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    for text in ("POST /v1/rerank", "POST /v2/rerank", "POST /score", "max_chunks_per_doc", "relevance_score",
                 "TeiRerankRequest", "truncation_direction", "text_1"):
        assert text in page.text
