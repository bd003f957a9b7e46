"""Abuse resistance, in-process: a scheduler that cannot fail silently, work bounded before it is
queued, logs that cannot be forged, refusals without 500s (issue 25). The live-server side is
in test_abuse_serving.py."""
import asyncio
import gzip
import logging
import random
import sys

import grpc
import pytest
from google.protobuf import struct_pb2
from helpers import WORDS

from rerank_server.checkpoint import QWEN3_TOKENIZER
from rerank_server.logs import PlainFormatter, RequestIdFilter
from rerank_server.metrics import Metrics
from rerank_server.models.registry import QWEN3_RERANKER
from rerank_server.prompts import PromptTokenizer
from rerank_server.rest import check_sizes, parse_message
from rerank_server.scheduler import QueueFullError, Scheduler, ShuttingDownError, launch_now
from rerank_server.schema import pb
from rerank_server.service import MAX_DOCUMENT_FIELDS, MAX_RANK_FIELDS, ApiError, RerankService
from rerank_server.tokenization import PairTokenizer, RequestTooLargeError


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def scheduled(launch, body, **kwargs):
    scheduler = Scheduler(launch, max_batch_tokens=kwargs.pop("max_batch_tokens", 100),
                          max_queued_tokens=kwargs.pop("max_queued_tokens", 10_000), **kwargs)
    scheduler.start()
    try:
        return await body(scheduler)
    finally:
        await scheduler.close()


class Gated:
    """A forward held until ``gate`` is set, so that several requests share its next batch;
    ``bad_batches`` of the first calls misbehave as ``mode`` says."""

    def __init__(self, mode: str, bad_batches: int = 1):
        self.mode, self.bad_batches, self.calls = mode, bad_batches, 0

    def __call__(self, pairs):
        self.calls += 1
        logits = [float(sum(p)) for p in pairs]
        if self.calls > self.bad_batches:
            return logits
        if self.mode == "raise":
            raise RuntimeError("the device fell over")
        if self.mode == "short":
            return logits[:-1]
        return logits


async def three_then_one(s: Scheduler):
    """Three requests that share one batch (the first forward), then one more after it."""
    first = await asyncio.gather(*(s.score([[n] * 3, [n] * 2]) for n in (1, 2, 3)), return_exceptions=True)
    later = await s.score([[5, 5]])
    return first, later


@pytest.mark.parametrize("mode", ["raise", "short"])
def test_a_failing_batch_fails_its_requests_and_the_next_is_served(mode):
    forward = Gated(mode)
    first, later = run(scheduled(launch_now(forward), three_then_one))
    assert forward.calls >= 2
    assert all(isinstance(r, RuntimeError) and not isinstance(r, ShuttingDownError) for r in first), first
    if mode == "short":
        assert "returned 5 logits for a batch of 6 pairs" in str(first[0])
    assert later == [10.0]


def test_a_failing_metrics_callback_fails_no_answer_and_serving_goes_on(caplog):
    calls = []

    def on_batch(pairs, tokens):
        calls.append((pairs, tokens))
        raise ValueError("metrics backend down")
    first, later = run(scheduled(launch_now(Gated("ok", 0)), three_then_one, on_batch=on_batch))
    # the answers were delivered before the callback ran; the error is logged, not swallowed
    assert first == [[3.0, 2.0], [6.0, 4.0], [9.0, 6.0]] and later == [10.0]
    assert len(calls) == 2
    assert any("metrics backend down" in (r.exc_text or "") or "metrics backend down" in str(r.exc_info)
               for r in caplog.records if r.levelno >= logging.ERROR)


def test_a_dead_batching_loop_fails_everything_open_and_reports_once():
    fatal = []

    async def body(s: Scheduler):
        def broken_take():
            raise KeyError("bug in the batcher")
        s._take_batch = broken_take  # a bug in the scheduler itself, not in a forward
        pending = asyncio.create_task(s.score([[1, 2, 3]]))
        result = await asyncio.gather(pending, return_exceptions=True)
        after = await asyncio.gather(s.score([[4]]), return_exceptions=True)
        return result[0], after[0]
    open_one, after = run(scheduled(launch_now(Gated("ok", 0)), body, on_fatal=fatal.append))
    assert isinstance(open_one, RuntimeError) and "scheduler failed" in str(open_one)
    assert isinstance(after, ShuttingDownError)  # later requests are refused (UNAVAILABLE), never left waiting
    assert len(fatal) == 1 and isinstance(fatal[0], KeyError)


def test_the_queue_limit_holds_on_an_empty_queue():
    async def body(s: Scheduler):
        with pytest.raises(QueueFullError):
            await s.score([[1] * 60, [2] * 60])  # 120 tokens > 100 queued, nothing else queued
        return await s.score([[1] * 50])
    assert run(scheduled(launch_now(Gated("ok", 0)), body, max_queued_tokens=100)) == [50.0]


# ---------------------------------------------------------------- work bounded before it is queued

@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PairTokenizer(tiny_checkpoint / "tokenizer.json", 512)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.mark.parametrize("chunks,keep_end", [(1, False), (4, False), (4, True)])
def test_the_token_cap_is_exact(tokenizer, chunks, keep_end):
    """Under the cap the pairs are what they are without one; one token over it refuses."""
    rng = random.Random(chunks)
    query, docs = text(rng, 12), [text(rng, rng.randint(1, 900)) for _ in range(6)]
    pairs, owner = tokenizer.encode_chunked(query, docs, None, chunks, keep_end=keep_end)
    total = sum(map(len, pairs))
    assert tokenizer.encode_chunked(query, docs, None, chunks, keep_end=keep_end, max_tokens=total) == (pairs, owner)
    with pytest.raises(RequestTooLargeError, match="--max-request-tokens"):
        tokenizer.encode_chunked(query, docs, None, chunks, keep_end=keep_end, max_tokens=total - 1)


def test_a_refused_request_costs_tokenization_bounded_by_the_cap(tokenizer, monkeypatch):
    """The issue's attack: a long query, one long document, 8-token windows and 10,000 chunks
    (61M tokens queued before). Refused, with no more of the document tokenized than the cap."""
    asked = []
    head = tokenizer.bounded.head
    monkeypatch.setattr(tokenizer.bounded, "head", lambda t, n: asked.append(n) or head(t, n))
    rng = random.Random(0)
    query, document = text(rng, 2000), text(rng, 60_000)
    with pytest.raises(RequestTooLargeError):
        tokenizer.encode_chunked(query, [document], 8, 10_000, max_tokens=20_000)
    assert max(asked) <= 20_001


def test_rank_fields_and_document_fields_are_bounded_before_any_work():
    service = RerankService(["m"], max_documents=1000)
    many_names = {"model": "m", "query": "q", "documents": [{}] * 1000, "rank_fields": ["f"] * 400_000}
    with pytest.raises(ApiError, match=f"rank_fields has 400000 names; the limit is {MAX_RANK_FIELDS}"):
        check_sizes(many_names, service)
    wide = {"documents": ["x", {f"k{i}": 1 for i in range(MAX_DOCUMENT_FIELDS + 1)}]}
    with pytest.raises(ApiError, match=r"documents\[1\] is an object of 257 fields"):
        check_sizes(wide, service)
    with pytest.raises(ApiError, match="texts has 1001 entries; the limit is 1000"):
        check_sizes({"texts": [""] * 1001}, service)
    # gRPC meets the same bounds in validate
    request = pb.RerankRequest(model="m", query="q", documents=[struct_pb2.Value(string_value="d")],
                               rank_fields=["f"] * (MAX_RANK_FIELDS + 1))
    with pytest.raises(ApiError, match="rank_fields has 101 names"):
        service.validate(request)


def test_an_integer_beyond_a_double_in_a_document_is_a_400_naming_the_field():
    body = {"model": "m", "query": "q", "documents": [{"text": "a", "n": 10 ** 400}]}
    with pytest.raises(ApiError, match="documents holds an integer too large") as e:
        parse_message(body, pb.RerankRequest)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("header", ["Bearer k\udcff", "Bearer \udce9t\udce9", "Bearer \x00secret"])
def test_undecodable_or_wrong_authorization_is_401_and_counted(header):
    metrics = Metrics()
    service = RerankService(["m"], max_documents=10, api_keys=["secret"], metrics=metrics)
    with pytest.raises(ApiError) as e:
        service.authenticate(header, "http")
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "secret" not in e.value.message
    assert metrics.auth_failures.labels("http")._value.get() == 1
    service.authenticate("Bearer secret", "http")  # the right key still passes


# ---------------------------------------------------------------- logs that cannot lie

def plain_line(message: str, *args, exc_info=None) -> str:
    record = logging.LogRecord("rerank_server", logging.INFO, __file__, 1, message, args, exc_info)
    RequestIdFilter().filter(record)
    return PlainFormatter().format(record)


def test_plain_logs_escape_every_control_character():
    forged = "/v1/rerank\n2026-12-06 10:00:00,000 INFO rerank_server [-] admin logged in\r\x00\x1b[2J\u2028"
    line = plain_line("POST %s 404", forged)
    assert "\n" not in line and "\r" not in line and "\x00" not in line and "\x1b" not in line
    assert "\u2028" not in line
    assert "\\n2026-12-06 10:00:00,000 INFO" in line and "\\x00\\x1b[2J\\u2028" in line


def test_a_traceback_cannot_start_a_line_of_its_own():
    try:
        raise ValueError("bad value\nFAKE 2026 INFO line")
    except ValueError:
        line = plain_line("failed", exc_info=sys.exc_info())
    head, *rest = line.splitlines()
    assert head.endswith("failed") and rest and all(r.startswith("    ") for r in rest)
    assert not any(r.startswith("FAKE") for r in line.splitlines())


@pytest.fixture(scope="module")
def prompt_tokenizer(tmp_path_factory):
    """The Qwen3-Reranker prompt tokenizer around the shipped Qwen3 tokenizer, at a small max length."""
    path = tmp_path_factory.mktemp("qwen3-tok") / "tokenizer.json"
    path.write_bytes(gzip.decompress(QWEN3_TOKENIZER.read_bytes()))
    return PromptTokenizer(path, 256, QWEN3_RERANKER)


@pytest.mark.parametrize("chunks,keep_end", [(1, False), (4, False), (4, True)])
def test_the_token_cap_is_exact_for_an_llm_reranker(prompt_tokenizer, chunks, keep_end):
    rng = random.Random(10 + chunks)
    query, docs = text(rng, 12), [text(rng, rng.randint(1, 700)) for _ in range(6)]
    pairs, owner = prompt_tokenizer.encode_chunked(query, docs, None, chunks, keep_end=keep_end)
    total = sum(map(len, pairs))
    capped = prompt_tokenizer.encode_chunked(query, docs, None, chunks, keep_end=keep_end, max_tokens=total)
    assert capped == (pairs, owner)
    with pytest.raises(RequestTooLargeError):
        prompt_tokenizer.encode_chunked(query, docs, None, chunks, keep_end=keep_end, max_tokens=total - 1)
