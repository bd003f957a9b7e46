"""Opt-in chunking and Cohere's request fields, through the service with a forward that
scores a pair 10 when it contains a marker token and 0 otherwise (random weights have no
notion of relevance; this isolates the chunking mechanism)."""
import asyncio
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import json_format

from rerank_server.scheduler import Scheduler, launch_now
from rerank_server.schema import pb
from rerank_server.service import ApiError, Reason, RerankService
from rerank_server.tokenization import PairTokenizer

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PairTokenizer(tiny_checkpoint / "tokenizer.json", MAX_LENGTH)


def rerank(tokenizer, body: dict):
    marker = tokenizer.tokenizer.encode("zebra", add_special_tokens=False).ids[-1]
    seen = []

    def forward(pairs):
        seen.extend(pairs)
        return [10.0 if marker in p[p.index(2) + 2:] else 0.0 for p in pairs]  # marker in the document part

    async def go():
        scheduler = Scheduler(launch_now(forward), max_batch_tokens=4096, max_queued_tokens=10**6)
        scheduler.start()
        service = RerankService(["m"], max_documents=100)
        service.attach(SimpleNamespace(tokenizer=tokenizer), scheduler)
        try:
            request = json_format.ParseDict({"model": "m", "raw_scores": True, **body}, pb.RerankRequest())
            return await service.rerank(request)
        finally:
            await scheduler.close()
    return asyncio.run(go()), seen


LONG = "A sentence about gardening and the weather in spring. " * 30 + "The zebra lives in Africa."


def test_passage_at_the_end_is_found_with_chunking_and_lost_without(tokenizer):
    body = {"query": "where does the zebra live?", "documents": ["Cats sleep a lot.", LONG]}
    plain, plain_pairs = rerank(tokenizer, body)
    assert [r.index for r in plain.results] == [0, 1]  # tie at 0: the truncated long document lost it
    assert plain.results[1].relevance_score == 0.0 and not plain.results[1].HasField("chunk_index")

    chunked, chunk_pairs = rerank(tokenizer, {**body, "max_chunks_per_doc": 100})
    assert [r.index for r in chunked.results] == [1, 0]
    best = chunked.results[0]
    assert best.relevance_score == 10.0
    windows = len(chunk_pairs) - 1
    assert windows > 5 and best.chunk_index == windows - 1  # the last window holds the passage
    # usage counts every window; every window fits the model
    assert chunked.usage.prompt_tokens == sum(map(len, chunk_pairs)) > plain.usage.prompt_tokens
    assert max(map(len, chunk_pairs)) <= MAX_LENGTH


def test_windows_overlap_and_cover_the_whole_document(tokenizer):
    _, pairs = rerank(tokenizer, {"query": "q", "documents": [LONG], "max_chunks_per_doc": 1000})
    doc_ids = tokenizer.tokenizer.encode(LONG, add_special_tokens=False).ids
    windows = [p[4:-1] for p in pairs]  # strip <s> q </s></s> ... </s> (the query is one token)
    covered = []
    stride = len(windows[0]) - len(windows[0]) // 8
    for k, w in enumerate(windows):
        assert w == doc_ids[k * stride: k * stride + len(windows[0])]
        covered.extend(range(k * stride, k * stride + len(w)))
    assert set(covered) == set(range(len(doc_ids)))


def test_max_chunks_caps_the_windows_and_max_tokens_sets_their_size(tokenizer):
    _, pairs = rerank(tokenizer, {"query": "q", "documents": [LONG, "short"], "max_chunks_per_doc": 3,
                                  "max_tokens_per_doc": 20})
    assert len(pairs) == 4  # 3 windows + the short document
    assert all(len(p) - 5 <= 20 for p in pairs)


def test_max_tokens_per_doc_truncates_without_chunking(tokenizer):
    response, pairs = rerank(tokenizer, {"query": "q", "documents": [LONG], "max_tokens_per_doc": 10})
    assert len(pairs) == 1 and len(pairs[0]) == 4 + 10 + 1
    assert response.usage.prompt_tokens == 15


def test_rank_fields_build_the_ranked_text(tokenizer):
    docs = [{"title": "zebra facts", "body": "Stripes."}, {"title": "Cats", "body": "The zebra is striped."}]
    by_title, _ = rerank(tokenizer, {"query": "q", "documents": docs, "rank_fields": ["title"]})
    assert [r.relevance_score for r in sorted(by_title.results, key=lambda r: r.index)] == [10.0, 0.0]
    by_body, _ = rerank(tokenizer, {"query": "q", "documents": docs, "rank_fields": ["body"]})
    assert [r.relevance_score for r in sorted(by_body.results, key=lambda r: r.index)] == [0.0, 10.0]
    # the fields a document lacks are skipped; with none of them its text is empty (as an
    # empty document is), so the request's validity never depends on each object's keys
    _, pairs = rerank(tokenizer, {"query": "q", "documents": docs, "rank_fields": ["nope", "title"]})
    assert pairs == tokenizer.encode_pairs("q", ["title: zebra facts", "title: Cats"])
    _, pairs = rerank(tokenizer, {"query": "q", "documents": docs, "rank_fields": ["nope"]})
    assert pairs == tokenizer.encode_pairs("q", [""])  # both documents are the same pair, scored once


def test_left_truncation_and_chunks_from_the_end(tokenizer):
    """truncation_direction LEFT keeps a document's end: the marker at the end survives."""
    body = {"query": "where does the zebra live?", "documents": [LONG]}
    right, _ = rerank(tokenizer, body)
    left, left_pairs = rerank(tokenizer, {**body, "truncation_direction": "LEFT"})
    assert right.results[0].relevance_score == 0.0 and left.results[0].relevance_score == 10.0
    doc = tokenizer.tokenizer.encode(LONG, add_special_tokens=False).ids
    assert left_pairs[0][-11:-1] == doc[-10:]
    chunked, chunk_pairs = rerank(tokenizer, {**body, "truncation_direction": "LEFT", "max_chunks_per_doc": 2})
    assert chunked.results[0].chunk_index == 0 and chunk_pairs[0] == left_pairs[0]  # window 0 is the end
    assert chunk_pairs[1][-11:-1] != doc[-10:]
    with pytest.raises(ApiError, match="--max-length") as e:
        rerank(tokenizer, {**body, "truncate": False})
    assert e.value.reason == Reason.TOO_LONG  # 413 over REST (rerank_server.rest.REASON_STATUS)


@pytest.mark.parametrize("field, value", [("max_chunks_per_doc", 0), ("max_tokens_per_doc", -3)])
def test_bad_chunking_fields_are_refused(tokenizer, field, value):
    with pytest.raises(ApiError, match=field) as e:
        rerank(tokenizer, {"query": "q", "documents": ["d"], field: value})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
