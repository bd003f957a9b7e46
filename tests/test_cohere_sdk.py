"""The real Cohere Python SDK (cohere==7.3.1), unchanged but for base_url, against the live
server: ``cohere.Client`` calls POST {base_url}/v1/rerank, ``cohere.ClientV2`` POST
{base_url}/v2/rerank. The SDK must parse our responses, with the scores our REST route gives."""
from __future__ import annotations

import cohere
import pytest
import requests
from helpers import DOCS, QUERY, SERVED_MODEL, start_server

pytestmark = pytest.mark.serving

OBJECT_DOCS = [
    {"title": "ML", "text": "Machine learning is a subset of artificial intelligence.", "source": "wiki"},
    {"title": "Weather", "text": "The weather today is sunny and warm."},
    {"title": "DL", "text": "Deep learning uses neural networks with multiple layers. " * 40},
    {"title": "Python", "text": "Python is a popular programming language."},
]


@pytest.fixture(scope="module")
def co(live_server):
    # The server has no API keys configured: any key is accepted (the SDK sends "Authorization: Bearer <key>").
    with cohere.Client(api_key="any-key", base_url=live_server.http_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def co2(live_server):
    return cohere.ClientV2(api_key="any-key", base_url=live_server.http_url, timeout=60)


def rest(server, path="/v1/rerank", **body) -> dict:
    r = requests.post(server.http_url + path, json={"model": SERVED_MODEL, "query": QUERY, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def check(results, expected: dict, n: int) -> None:
    """The SDK's parsed results against our REST route's JSON for the same request."""
    assert len(results) == n == len(expected["results"])
    assert [r.index for r in results] == [r["index"] for r in expected["results"]]
    scores = [r.relevance_score for r in results]
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert scores == pytest.approx([r["relevance_score"] for r in expected["results"]], abs=1e-6)


def test_v1_string_documents(live_server, co):
    response = co.rerank(model=SERVED_MODEL, query=QUERY, documents=DOCS)
    assert isinstance(response, cohere.RerankResponse)
    check(response.results, rest(live_server, documents=DOCS), len(DOCS))
    assert response.id.startswith("rerank-")
    assert all(r.document is None for r in response.results)

    response = co.rerank(model=SERVED_MODEL, query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    check(response.results, rest(live_server, documents=DOCS, top_n=2, return_documents=True), 2)
    # We echo a string document as the string sent; the SDK keeps it as a plain str.
    assert [r.document for r in response.results] == [DOCS[r.index] for r in response.results]


@pytest.mark.xfail(strict=True, reason="by default /v1/rerank echoes string documents as the seed's strings; "
                   "Cohere's API (and the SDK's RerankResponseResultsItemDocument) has {\"text\": ...}, so "
                   "result.document.text needs --document-objects (test_v1_document_objects_flag)")
def test_v1_string_document_has_text_attribute(co):
    response = co.rerank(model=SERVED_MODEL, query=QUERY, documents=DOCS, top_n=1, return_documents=True)
    assert response.results[0].document.text == DOCS[response.results[0].index]


@pytest.fixture(scope="module")
def objects_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("cohere-objects") / "server.log",
                          "--document-objects")
    yield server
    assert server.stop() == 0, server.log()


@pytest.mark.slow  # starts a server of its own
def test_v1_document_objects_flag(objects_server):
    with cohere.Client(api_key="any-key", base_url=objects_server.http_url, timeout=60) as co:
        response = co.rerank(model=SERVED_MODEL, query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    assert [r.document.text for r in response.results] == [DOCS[r.index] for r in response.results]


def test_v1_object_documents(live_server, co):
    fields = dict(documents=OBJECT_DOCS, rank_fields=["title", "text"], return_documents=True, top_n=3,
                  max_chunks_per_doc=4)
    response = co.rerank(model=SERVED_MODEL, query=QUERY, **fields)
    expected = rest(live_server, **fields)
    check(response.results, expected, 3)
    for r in response.results:
        assert isinstance(r.document, cohere.RerankResponseResultsItemDocument)
        assert r.document.text == OBJECT_DOCS[r.index]["text"]
        assert r.document.model_dump() == OBJECT_DOCS[r.index]  # extra fields kept (extra="allow")
        assert r.model_dump()["chunk_index"] == next(x["chunk_index"] for x in expected["results"]
                                                     if x["index"] == r.index)
    # rank_fields changes what is scored: ranking on "text" alone gives other scores
    plain = co.rerank(model=SERVED_MODEL, query=QUERY, documents=OBJECT_DOCS)
    check(plain.results, rest(live_server, documents=OBJECT_DOCS), len(OBJECT_DOCS))
    assert {r.index: r.relevance_score for r in plain.results} != pytest.approx(
        {r.index: r.relevance_score for r in co.rerank(model=SERVED_MODEL, query=QUERY, documents=OBJECT_DOCS,
                                                       rank_fields=["title", "text"]).results}, abs=1e-9)


def test_v2(live_server, co2):
    response = co2.rerank(model=SERVED_MODEL, query=QUERY, documents=DOCS)
    assert isinstance(response, cohere.V2RerankResponse)
    check(response.results, rest(live_server, "/v2/rerank", documents=DOCS), len(DOCS))

    response = co2.rerank(model=SERVED_MODEL, query=QUERY, documents=DOCS, top_n=3, max_tokens_per_doc=3)
    expected = rest(live_server, "/v2/rerank", documents=DOCS, top_n=3, max_tokens_per_doc=3)
    check(response.results, expected, 3)
    assert expected == {**rest(live_server, documents=DOCS, top_n=3, max_tokens_per_doc=3),
                        "id": expected["id"], "created": expected["created"]}  # /v2 is /v1
    # truncation to 3 document tokens changes the scores
    assert [r.relevance_score for r in response.results] != pytest.approx(
        [r["relevance_score"] for r in rest(live_server, documents=DOCS, top_n=3)["results"]], abs=1e-9)


def test_errors_surface_as_sdk_exceptions(co, co2):
    with pytest.raises(cohere.NotFoundError) as e:
        co.rerank(model="no-such-model", query=QUERY, documents=DOCS)
    assert e.value.status_code == 404 and "no-such-model" in e.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as e:
        co2.rerank(model=SERVED_MODEL, query=QUERY, documents=DOCS, top_n=0)
    assert e.value.body == {"code": 3, "message": "top_n must be an integer >= 1, got 0", "details": []}
    # The SDK leaves model optional on v1 and omits it; this server requires it.
    with pytest.raises(cohere.BadRequestError) as e:
        co.rerank(query=QUERY, documents=DOCS)
    assert e.value.body["message"].startswith("model is required")
