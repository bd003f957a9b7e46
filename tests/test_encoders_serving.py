"""A real rerank-server process serving a ModernBERT and a DeBERTa-v2 checkpoint over REST: /info's
family, every dialect (/v1/rerank, /v2/rerank, TEI's /rerank, /score), chunking and usage, with
scores checked against transformers' sequence classifier on the same pairs."""
from __future__ import annotations

import pytest
import requests
import test_deberta_v2
import test_modernbert
from helpers import SERVED_MODEL, start_server

from rerank_server.encoder_checkpoints import write_encoder_checkpoint
from rerank_server.engine import Engine

pytestmark = [pytest.mark.slow, pytest.mark.serving]

MAX_LENGTH = 128
QUERY = "what is the capital of france?"
DOCS = ["Paris is the capital of France.", "Gravity is a force.", "", "France is a country in Europe. " * 40]
# family -> (checkpoint overrides, transformers' logits for the pairs)
FAMILIES = {
    "modernbert": (dict(local_attention=16), lambda path, pairs: test_modernbert.hf_scores(path, [list(p)
                                                                                                 for p in pairs])),
    "deberta-v2": ({}, test_deberta_v2.hf_scores),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    family = request.param
    checkpoint = write_encoder_checkpoint(tmp_path_factory.mktemp(family), family, seed=29, **FAMILIES[family][0])
    server = start_server(checkpoint, tmp_path_factory.mktemp(f"{family}-logs") / "server.log",
                          "--max-length", str(MAX_LENGTH))
    tokenizer = Engine.load_tokenizer(checkpoint, MAX_LENGTH)

    def reference(documents: list[str], **kwargs) -> tuple[list[float], int]:
        pairs = tokenizer.encode_pairs(QUERY, documents, **kwargs)
        return FAMILIES[family][1](checkpoint, pairs).tolist(), sum(map(len, pairs))

    yield family, server, tokenizer, checkpoint, reference
    assert server.stop() == 0, server.log()


def post(server, path: str, body: dict) -> dict:
    r = requests.post(server.http_url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_info_names_the_family(served):
    family, server, *_ = served
    info = requests.get(server.http_url + "/info", timeout=10).json()
    assert info["family"] == family and info["max_length"] == MAX_LENGTH and "template" not in info


def test_every_dialect_scores_as_transformers(served):
    _, server, _, _, reference = served
    logits, tokens = reference(DOCS)
    body = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS, "raw_scores": True})
    assert body["usage"]["prompt_tokens"] == tokens
    assert [r["index"] for r in body["results"]] == sorted(range(len(DOCS)), key=lambda i: -logits[i])
    for r in body["results"]:
        assert abs(r["relevance_score"] - logits[r["index"]]) <= 1e-4
    v2 = post(server, "/v2/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS, "raw_scores": True,
                                     "return_documents": True})
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in v2["results"])
    tei = post(server, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True})
    assert all(abs(r["score"] - logits[r["index"]]) <= 1e-4 for r in tei)
    data = post(server, "/score", {"text_1": QUERY, "text_2": DOCS[:2], "raw_scores": True})["data"]
    assert [abs(d["score"] - logit) <= 1e-4 for d, logit in zip(data, logits[:2], strict=True)] == [True, True]


def test_chunking_scores_the_best_window(served):
    family, server, tokenizer, checkpoint, _ = served
    long = DOCS[3] + " Paris is the capital of France."
    pairs, owner = tokenizer.encode_chunked(QUERY, [long, DOCS[0]], max_chunks=3)
    assert owner.count(0) == 3
    logits = FAMILIES[family][1](checkpoint, pairs).tolist()
    body = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": [long, DOCS[0]],
                                       "max_chunks_per_doc": 3, "raw_scores": True})
    first = next(r for r in body["results"] if r["index"] == 0)
    best = max(range(3), key=lambda i: logits[i])
    assert first["chunk_index"] == best and abs(first["relevance_score"] - logits[best]) <= 1e-4
    assert body["usage"]["prompt_tokens"] == sum(map(len, pairs))
