"""A real rerank-server process serving a Qwen3-Reranker checkpoint over REST: every dialect, the
instruction field, chunking, usage (every pair's tokens, whatever the shared prefix saved), /info;
and an encoder server refusing the instruction. Scores are checked against transformers' causal LM
scored the model card's way (test_qwen3.card_scores)."""
from __future__ import annotations

import math

import grpc
import pytest
import requests
from helpers import SERVED_MODEL, grpc_request, start_server, stub
from test_qwen3 import QUERY, card_scores, long_documents, qwen3_checkpoint, qwen3_tokenizer_dir  # noqa: F401

from rerank_server.engine import Engine
from rerank_server.models.registry import QWEN3_RERANKER

pytestmark = [pytest.mark.slow, pytest.mark.serving]

MAX_LENGTH = 200
DOCS = ["The capital of China is Beijing.", "Gravity is a force.", "", "Beijing is a city in China. " * 3]
INSTRUCTION = "Given a question about geography, find the passage that answers it"


@pytest.fixture(scope="module")
def qwen3_server(qwen3_tokenizer_dir, tmp_path_factory):  # noqa: F811
    checkpoint = qwen3_checkpoint(tmp_path_factory.mktemp("qwen3-served"), qwen3_tokenizer_dir, seed=23)
    server = start_server(checkpoint, tmp_path_factory.mktemp("qwen3-logs") / "server.log",
                          "--max-length", str(MAX_LENGTH))
    yield server, checkpoint, Engine.load_tokenizer(checkpoint, MAX_LENGTH)
    assert server.stop() == 0, server.log()


def post(server, path: str, body: dict, status: int = 200) -> requests.Response:
    r = requests.post(server.http_url + path, json=body, timeout=120)
    assert r.status_code == status, r.text
    return r


def expected(checkpoint, tokenizer, query: str, documents: list[str], **kwargs) -> tuple[list[float], int]:
    """transformers' z_yes - z_no per pair, and the pairs' tokens."""
    pairs = tokenizer.encode_pairs(query, documents, **kwargs)
    margin, _ = card_scores(checkpoint, [list(p) for p in pairs])
    return margin.tolist(), sum(map(len, pairs))


def test_info_shows_the_family_and_template(qwen3_server):
    server, _, _ = qwen3_server
    info = requests.get(server.http_url + "/info", timeout=10).json()
    assert info["family"] == "qwen3" and info["max_length"] == MAX_LENGTH
    assert info["template"]["prefix"] == QWEN3_RERANKER.prefix
    assert info["template"]["default_instruction"] == QWEN3_RERANKER.default_instruction
    assert info["template"]["answer_tokens"] == ["yes", "no"]


def test_rerank_scores_usage_and_instruction(qwen3_server):
    server, checkpoint, tokenizer = qwen3_server
    margins, tokens = expected(checkpoint, tokenizer, QUERY, DOCS)
    body = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS,
                                       "raw_scores": True}).json()
    assert body["usage"]["prompt_tokens"] == tokens  # every pair's tokens, the shared prefix counted in each
    for r in body["results"]:
        assert abs(r["relevance_score"] - margins[r["index"]]) <= 1e-4
    probabilities = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS}).json()
    for r in probabilities["results"]:
        assert abs(r["relevance_score"] - 1 / (1 + math.exp(-margins[r["index"]]))) <= 1e-4
    with_instruction, _ = expected(checkpoint, tokenizer, QUERY, DOCS, instruction=INSTRUCTION)
    body = post(server, "/v2/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS, "raw_scores": True,
                                       "instruction": INSTRUCTION}).json()
    for r in body["results"]:
        assert abs(r["relevance_score"] - with_instruction[r["index"]]) <= 1e-4
    assert max(abs(a - b) for a, b in zip(with_instruction, margins, strict=True)) > 1e-4
    metrics = requests.get(server.http_url + "/metrics", timeout=10).text
    spared = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("rerank_shared_prefix_tokens_total"))
    assert spared >= 3 * len(tokenizer.prefix)  # the prefix computed once, not for each of the 4 documents


def test_tei_and_score_dialects(qwen3_server):
    server, checkpoint, tokenizer = qwen3_server
    margins, _ = expected(checkpoint, tokenizer, QUERY, DOCS)
    tei = post(server, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert sorted(r["index"] for r in tei) == list(range(len(DOCS)))
    for r in tei:
        assert abs(r["score"] - margins[r["index"]]) <= 1e-4
    with_instruction, _ = expected(checkpoint, tokenizer, QUERY, DOCS[:2], instruction=INSTRUCTION)
    data = post(server, "/score", {"text_1": QUERY, "text_2": DOCS[:2], "raw_scores": True,
                                   "instruction": INSTRUCTION}).json()["data"]
    assert [abs(d["score"] - m) <= 1e-4 for d, m in zip(data, with_instruction, strict=True)] == [True, True]


def test_chunking_scores_the_best_window_of_the_document_part(qwen3_server):
    server, checkpoint, tokenizer = qwen3_server
    long = long_documents(1, seed=8, longest=900)[0] + " Beijing is the capital of China."
    pairs, owner = tokenizer.encode_chunked(QUERY, [long, DOCS[0]], max_chunks=4)
    assert owner.count(0) == 4
    margins, _ = card_scores(checkpoint, [list(p) for p in pairs])
    body = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": [long, DOCS[0]],
                                       "max_chunks_per_doc": 4, "raw_scores": True}).json()
    by_index = {r["index"]: r for r in body["results"]}
    best = max(range(4), key=lambda i: margins[i])
    assert by_index[0]["chunk_index"] == best
    assert abs(by_index[0]["relevance_score"] - margins[best]) <= 1e-4
    assert body["usage"]["prompt_tokens"] == sum(map(len, pairs))


def test_grpc_takes_the_instruction_and_the_client_sends_it(qwen3_server):
    server, checkpoint, tokenizer = qwen3_server
    with_instruction, _ = expected(checkpoint, tokenizer, QUERY, DOCS, instruction=INSTRUCTION)
    channel, rerank = stub(server)
    with channel:
        reply = rerank.Rerank(grpc_request(QUERY, DOCS, raw_scores=True, instruction=INSTRUCTION), timeout=60)
    for r in reply.results:
        assert abs(r.relevance_score - with_instruction[r.index]) <= 1e-4
    from rerank_client import RerankClient
    with RerankClient(server.grpc_address) as client:
        scores = client.score(QUERY, DOCS, model=SERVED_MODEL, raw_scores=True, instruction=INSTRUCTION)
    assert max(abs(a - b) for a, b in zip(scores, with_instruction, strict=True)) <= 1e-4


def test_an_encoder_refuses_the_instruction_naming_the_field(live_server):
    for path, body in (("/v1/rerank", {"model": SERVED_MODEL, "query": "q", "documents": ["d"], "instruction": "x"}),
                       ("/score", {"text_1": "q", "text_2": ["d"], "instruction": "x"})):
        r = post(live_server, path, body, status=400)
        assert "instruction" in r.json()["message"]
    channel, rerank = stub(live_server)
    with channel, pytest.raises(grpc.RpcError) as e:
        rerank.Rerank(grpc_request("q", ["d"], instruction="x"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "instruction" in e.value.details()
