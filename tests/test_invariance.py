"""Batch invariance on the CPU, as a property: a pair's raw score is bitwise identical alone,
in any batch, at any position, under any split of a request over batches and under concurrent
requests; in float32, in bfloat16 (where the CPU has it natively) and in int8 (where it has
VNNI or AMX: per-row activation scales). Through the engine (the
small model: its FFN down-projection has K = 1536, past oneDNN's M=1 trap at K >= 1280), at
the full model's width (two layers at hidden 1024 / FFN 4096, 16 heads), and through a live
server. The GEMMs are chosen at load as in production (--cpu-gemm auto)."""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import SERVED_MODEL, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rerank_kernels
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.engine import Engine
from rerank_server.tokenization import EncodedPair

NATIVE_BF16 = rerank_kernels.native_bf16_missing() is None
INT8_MISSING = rerank_kernels.linear_int8.int8_missing()
DTYPES = ["float32", pytest.param("bfloat16", marks=pytest.mark.skipif(
    not NATIVE_BF16, reason="this CPU has no native bfloat16")),
    pytest.param("int8", marks=pytest.mark.skipif(INT8_MISSING is not None, reason=f"no int8: {INT8_MISSING}"))]
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])


def random_pairs(lengths: list[int], seed: int, vocab: int) -> list[list[int]]:
    """Token-id lists of the given lengths: <s> ... </s>, ids from the vocabulary's body."""
    rng = random.Random(seed)
    return [[0] + [rng.randrange(5, vocab) for _ in range(n - 2)] + [2] for n in lengths]


@st.composite
def batchings(draw, max_pairs: int, max_length: int):
    """(pair lengths, seed, batches): the pairs' indices shuffled and cut into batches."""
    lengths = draw(st.lists(st.integers(3, max_length), min_size=1, max_size=max_pairs))
    order = draw(st.permutations(range(len(lengths))))
    cuts = sorted(draw(st.sets(st.integers(1, max(len(lengths) - 1, 1)), max_size=4)))
    cuts = [c for c in cuts if c < len(lengths)]
    batches = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(lengths)], strict=True)]
    return lengths, draw(st.integers(0, 2 ** 16)), batches


def assert_invariant(engine: Engine, pairs: list[list[int]], batches: list[list[int]]) -> None:
    alone = [engine.forward([pair])[0] for pair in pairs]
    together = engine.forward(pairs)
    assert together == alone, [(i, a, b) for i, (a, b) in enumerate(zip(together, alone, strict=True)) if a != b]
    for batch in batches:
        got = engine.forward([pairs[i] for i in batch])
        assert got == [alone[i] for i in batch], (batch, got, [alone[i] for i in batch])


@pytest.fixture(scope="module", params=DTYPES)
def small_engine(request, small_checkpoint):
    return Engine.load(str(small_checkpoint), "cpu", dtype=request.param)


@settings(SLOW, max_examples=12)
@given(case=batchings(max_pairs=10, max_length=200))
def test_engine_scores_do_not_depend_on_the_batch(small_engine, case):
    lengths, seed, batches = case
    assert_invariant(small_engine, random_pairs(lengths, seed, 250002), batches)


def random_bert_pairs(lengths: list[int], seed: int, vocab: int) -> list[EncodedPair]:
    """[CLS] query [SEP] document [SEP] of the given lengths, token type 1 from the document on."""
    rng = random.Random(seed)
    pairs = []
    for n in lengths:
        body = [rng.randrange(1000, vocab) for _ in range(n - 3)]
        split = rng.randrange(len(body) + 1)
        pairs.append(EncodedPair([101, *body[:split], 102, *body[split:], 102], split + 2))
    return pairs


@pytest.fixture(scope="module", params=DTYPES)
def bert_engine(request, tmp_path_factory):
    checkpoint = write_random_checkpoint(tmp_path_factory.mktemp("bert"), "small", seed=3, family="bert")
    return Engine.load(str(checkpoint), "cpu", dtype=request.param)


@settings(SLOW, max_examples=8)
@given(case=batchings(max_pairs=10, max_length=200))
def test_bert_scores_do_not_depend_on_the_batch(bert_engine, case):
    """The BERT family too: token types, positions from 0 and the pooler head."""
    lengths, seed, batches = case
    assert_invariant(bert_engine, random_bert_pairs(lengths, seed, 30522), batches)


@pytest.fixture(scope="module")
def full_width_checkpoint(tmp_path_factory):
    """Two layers at bge-reranker-v2-m3's width (hidden 1024, FFN 4096, 16 heads), a small
    vocabulary and 512 positions (105 MB)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("full_width"), "full", seed=7, num_hidden_layers=2,
                                   vocab_size=2000, max_position_embeddings=514)


@pytest.fixture(scope="module", params=DTYPES)
def full_width_engine(request, full_width_checkpoint):
    return Engine.load(str(full_width_checkpoint), "cpu", dtype=request.param)


@settings(SLOW, max_examples=4)
@given(case=batchings(max_pairs=6, max_length=300))
def test_full_width_scores_do_not_depend_on_the_batch(full_width_engine, case):
    lengths, seed, batches = case
    assert_invariant(full_width_engine, random_pairs(lengths, seed, 2000), batches)


# ----------------------------------------------------------------------------- through a server

WORDS = ("machine learning model neural network data rerank query document search index vector token "
         "weather sunny python language deep layer attention score relevance the a of in").split()
MAX_LENGTH = 48


@pytest.fixture(scope="module", params=DTYPES)
def server(request, tiny_checkpoint, tmp_path_factory):
    """--max-length 48 and --max-batch-tokens 96: a request of more than two long documents is
    split over batches, and concurrent requests share them."""
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("invariance") / "server.log",
                          "--device", "cpu", "--dtype", request.param, "--max-length", str(MAX_LENGTH),
                          "--max-batch-tokens", str(2 * MAX_LENGTH), "--max-documents", "20")
    yield server
    assert server.stop() == 0, server.log()


def raw_scores(server, query: str, documents: list[str]) -> list[float]:
    r = requests.post(server.http_url + "/v1/rerank", json={"model": SERVED_MODEL, "query": query,
                                                            "documents": documents, "raw_scores": True}, timeout=120)
    assert r.status_code == 200, r.text
    by_index = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    return [by_index[i] for i in range(len(documents))]


texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=60).map(" ".join)


@settings(SLOW, max_examples=6)
@given(documents=st.lists(texts, min_size=1, max_size=12), cuts=st.lists(st.integers(1, 11), max_size=3))
def test_server_scores_do_not_depend_on_the_batch_or_concurrency(server, documents, cuts):
    query = "what is a neural reranking model"
    alone = [raw_scores(server, query, [d])[0] for d in documents]
    assert raw_scores(server, query, documents) == alone
    # the same documents reversed and cut into requests sent at once (the scheduler batches them together)
    order = list(reversed(range(len(documents))))
    bounds = sorted({c for c in cuts if c < len(order)})
    requests_ = [order[a:b] for a, b in zip([0, *bounds], [*bounds, len(order)], strict=True)]
    with ThreadPoolExecutor(len(requests_)) as pool:
        results = list(pool.map(lambda idx: raw_scores(server, query, [documents[i] for i in idx]), requests_))
    for idx, got in zip(requests_, results, strict=True):
        assert got == [alone[i] for i in idx]


def test_server_info_shows_the_dtype_and_the_gemm_choices(server):
    info = requests.get(server.http_url + "/info", timeout=30).json()
    assert info["dtype"] in ("float32", "bfloat16", "int8") and info["device"] == "cpu"
    by_kind = info["kernel_choices"]["cpu_gemm"]["by_kind"]
    assert {entry["chosen"] for entry in by_kind.values()} <= {"onednn", "torch"} and len(by_kind) == 8
    assert "CPU GEMMs measured in" in server.log() and f"{info['dtype']} on cpu" in server.log()
