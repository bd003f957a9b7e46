"""GET /openapi.json describes what the server really accepts and returns: live responses,
good and bad, validate against it, and its routes are exactly the server's."""
import jsonschema
import pytest
import requests

from conftest import SERVED_MODEL


@pytest.fixture(scope="module")
def spec(live_server):
    response = requests.get(live_server.http_url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


def validate(spec, name, body):
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{name}", "components": spec["components"]},
                        cls=jsonschema.Draft202012Validator)


GOOD = [
    {"query": "q", "documents": ["a", "b", ""]},
    {"query": "q", "documents": ["a", {"text": "b"}], "return_documents": True, "top_n": 1},
    {"query": "q", "documents": ["a " * 300], "raw_scores": True, "max_chunks_per_doc": 4, "max_tokens_per_doc": 50},
    {"query": "q", "documents": [{"title": "t", "text": "x"}], "rank_fields": ["title"], "return_documents": True},
]
BAD = [
    {"query": "q", "documents": []},
    {"model": "nope", "query": "q", "documents": ["a"]},
    {"query": "", "documents": ["a"]},
    {"query": "q", "documents": ["a"], "top_n": 0},
    {"query": "q", "documents": [5]},
]


@pytest.mark.parametrize("body", GOOD)
def test_good_responses_match_the_document(spec, live_server, body):
    for path in [p for p, ops in spec["paths"].items() if "post" in ops]:
        response = requests.post(live_server.http_url + path, json={"model": SERVED_MODEL, **body}, timeout=30)
        assert response.status_code == 200, response.text
        validate(spec, spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
                 ["$ref"].rsplit("/", 1)[-1], response.json())


@pytest.mark.parametrize("body", BAD)
def test_errors_match_the_document(spec, live_server, body):
    response = requests.post(live_server.http_url + "/v1/rerank", json={"model": SERVED_MODEL, **body}, timeout=30)
    assert str(response.status_code) in spec["paths"]["/v1/rerank"]["post"]["responses"]
    validate(spec, "Error", response.json())


def test_request_schema_requires_what_the_server_requires(spec, live_server):
    request = spec["components"]["schemas"]["RerankRequest"]
    assert request["required"] == ["model", "query", "documents"]
    for field in request["required"]:
        body = {"model": SERVED_MODEL, "query": "q", "documents": ["a"]}
        del body[field]
        response = requests.post(live_server.http_url + "/v1/rerank", json=body, timeout=10)
        assert response.status_code == 400 and field in response.json()["message"]


def test_documented_routes_are_the_served_routes(spec, live_server):
    assert {"/v1/rerank", "/rerank", "/v2/rerank"} <= set(spec["paths"])
    for path, ops in spec["paths"].items():
        for verb in ops:
            response = requests.request(verb, live_server.http_url + path,
                                        json={"model": SERVED_MODEL, "query": "q", "documents": ["a"]}, timeout=10)
            assert response.status_code == 200, (verb, path, response.text)
    # descriptions come from the proto's comments
    assert "sigmoid" in spec["components"]["schemas"]["RerankResult"]["properties"]["relevance_score"]["description"]


def test_docs_page_lists_routes_and_fields(live_server):
    page = requests.get(live_server.http_url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    for text in ("POST /v1/rerank", "POST /v2/rerank", "max_chunks_per_doc", "relevance_score"):
        assert text in page.text
