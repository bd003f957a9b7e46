"""rerank_client against live servers: the sync and async gRPC clients agree with REST, typed
results, documents round-trip, deadlines, errors not retried, waiting for a starting server, API
keys, health, and the ``python -m rerank_client`` CLI over both transports."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import grpc
import pytest
import requests
from helpers import DOCS, QUERY, ROOT, SERVED_MODEL, free_port, start_server

from rerank_client import AsyncRerankClient, RerankClient, RerankError, RerankResponse, RerankResult

pytestmark = pytest.mark.serving

MIXED = ["A plain string document about machine learning.",
         {"text": "An object document on neural networks.", "title": "NN", "year": 2024, "tags": ["a", "b"]}]
BIG = [("token " * 200) + str(i) for i in range(50)]
API_KEY = "client-test-key"


def rest(server, documents=DOCS, headers=None, **fields) -> dict:
    body = {"model": SERVED_MODEL, "query": QUERY, "documents": documents, **fields}
    r = requests.post(server.http_url + "/v1/rerank", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def arun(coro_fn, *args, **kwargs):
    """Runs ``coro_fn(client, ...)`` with a fresh AsyncRerankClient (``client_kwargs``) in a new loop."""
    target, client_kwargs = kwargs.pop("target"), kwargs.pop("client_kwargs", {})

    async def main():
        async with AsyncRerankClient(target, **client_kwargs) as client:
            return await coro_fn(client, *args, **kwargs)
    return asyncio.run(main())


@pytest.fixture(scope="module")
def client(live_server):
    with RerankClient(live_server.grpc_address, timeout=60) as c:
        yield c


def grpc_requests(server, code: str) -> float:
    """The server's own count of gRPC Rerank calls that ended with ``code`` (GET /metrics)."""
    text = requests.get(server.http_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("rerank_requests_total{") and 'transport="grpc"' in line and f'code="{code}"' in line \
                and 'route="Rerank"' in line:  # not the Score RPC's line (earlier tests make one)
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# Interceptors that count the calls the application makes (gRPC's own retries happen below them:
# tests/test_client_balancing.py counts those on the servers).

class Counting(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.attempts = 0

    def intercept_unary_unary(self, continuation, details, request):
        self.attempts += 1
        return continuation(details, request)


class AioCounting(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.attempts = 0

    async def intercept_unary_unary(self, continuation, details, request):
        self.attempts += 1
        return await continuation(details, request)


# Agreement with REST, typed results, documents.

@pytest.mark.parametrize("fields", [{}, {"top_n": 2}, {"raw_scores": True},
                                    {"max_tokens_per_doc": 4, "max_chunks_per_doc": 3, "top_n": 3}])
def test_sync_async_and_rest_agree(live_server, client, fields):
    expected = rest(live_server, **fields)
    sync = client.rerank(QUERY, DOCS, **fields)

    async def call(c):
        return await c.rerank(QUERY, DOCS, **fields)
    asynchronous = arun(call, target=live_server.grpc_address)
    for response in (sync, asynchronous):
        assert [r.index for r in response.results] == [r["index"] for r in expected["results"]]
        assert [r.relevance_score for r in response.results] == pytest.approx(
            [r["relevance_score"] for r in expected["results"]], abs=1e-6)
        assert [r.chunk_index for r in response.results] == [r.get("chunk_index") for r in expected["results"]]
        assert response.model == expected["model"] == SERVED_MODEL
        assert response.prompt_tokens == expected["usage"]["prompt_tokens"]


@pytest.mark.parametrize("fields", [{}, {"raw_scores": True}])
def test_score_sync_and_async_agree_with_rest(live_server, client, fields):
    """The Score RPC through both clients: one score per text_2, in order, as POST /score gives."""
    r = requests.post(live_server.http_url + "/score", timeout=60,
                      json={"model": SERVED_MODEL, "text_1": QUERY, "text_2": DOCS, **fields})
    assert r.status_code == 200, r.text
    expected = [d["score"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
    sync = client.score(QUERY, DOCS, **fields)

    async def call(c):
        return await c.score([QUERY] * len(DOCS), DOCS, **fields)  # a list of text_1, one per text_2
    asynchronous = arun(call, target=live_server.grpc_address)
    assert len(sync) == len(DOCS)
    assert sync == pytest.approx(expected, abs=1e-6) and asynchronous == pytest.approx(expected, abs=1e-6)
    # and they are the rerank scores of the same pairs, by document
    ranked = {x.index: x.relevance_score for x in client.rerank(QUERY, DOCS, **fields).results}
    assert sync == pytest.approx([ranked[i] for i in range(len(DOCS))], abs=1e-6)
    with pytest.raises(RerankError) as e:
        client.score(["a", "b"], ["x", "y", "z"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "text_1" in e.value.message


def test_typed_results(client):
    before = int(time.time())
    response = client.rerank(QUERY, DOCS, top_n=3)
    assert isinstance(response, RerankResponse)
    assert re.fullmatch(r"rerank-[0-9a-f]+", response.id)
    assert response.model == SERVED_MODEL and response.prompt_tokens > 0
    assert before - 1 <= response.created <= time.time() + 1
    assert len(response.results) == 3
    for r in response.results:
        assert isinstance(r, RerankResult) and isinstance(r.index, int) and isinstance(r.relevance_score, float)
        assert 0.0 <= r.relevance_score <= 1.0 and r.document is None and r.chunk_index is None
    scores = [r.relevance_score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    # an alias is a served name too
    assert client.rerank(QUERY, DOCS, model="reranker").model == SERVED_MODEL


def test_grpc_object_documents_are_as_the_docstring_says(live_server, client):
    """What RerankResult's docstring and the README say gRPC returns: every number a float
    (integers past 2**53 rounded), everything else unchanged; REST returns the JSON as sent."""
    sent = {"text": "t", "id": 7, "big": 2**53 + 1, "score": 0.5, "ok": True, "none": None,
            "tags": ["a", 1, {"n": 2}], "nested": {"deep": {"x": -3}}}
    document = client.rerank(QUERY, [sent], return_documents=True).results[0].document
    assert document == {"text": "t", "id": 7.0, "big": float(2**53), "score": 0.5, "ok": True, "none": None,
                        "tags": ["a", 1.0, {"n": 2.0}], "nested": {"deep": {"x": -3.0}}}
    assert all(type(v) is float for v in (document["id"], document["big"], document["tags"][1],
                                          document["tags"][2]["n"], document["nested"]["deep"]["x"]))
    assert document["big"] != sent["big"]  # rounded
    over_rest = rest(live_server, [sent], return_documents=True)["results"][0]["document"]
    assert over_rest == sent and type(over_rest["id"]) is int and over_rest["big"] == 2**53 + 1


def test_documents_round_trip(live_server, client):
    response = client.rerank(QUERY, MIXED, return_documents=True)
    by_index = {r.index: r.document for r in response.results}
    assert by_index[0] == MIXED[0] and isinstance(by_index[0], str)
    # google.protobuf.Struct keeps JSON numbers as doubles: 2024 comes back as 2024.0 (== 2024)
    assert by_index[1] == MIXED[1] and isinstance(by_index[1], dict) and isinstance(by_index[1]["year"], float)
    assert by_index == {r["index"]: r["document"] for r in rest(live_server, MIXED, return_documents=True)["results"]}

    async def call(c):
        return await c.rerank(QUERY, MIXED, return_documents=True, rank_fields=["title", "text"])
    ranked = arun(call, target=live_server.grpc_address)
    assert {r.index: r.document for r in ranked.results} == by_index
    assert client.rerank(QUERY, MIXED).results[0].document is None  # not asked for
    with pytest.raises(TypeError):
        client.rerank(QUERY, "not a list")


# Deadlines and retries.

def test_deadline_exceeded(live_server):
    counting = Counting()
    with RerankClient(live_server.grpc_address, timeout=0.001, max_retries=4, interceptors=[counting]) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, BIG)  # the constructor's default deadline
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, BIG, timeout=0.0001)  # a per-call deadline
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert counting.attempts == 2  # not retried
        assert len(c.rerank(QUERY, BIG, timeout=60).results) == 50

    async def call(c):
        return await c.rerank(QUERY, BIG, timeout=0.001)
    with pytest.raises(RerankError) as e:
        arun(call, target=live_server.grpc_address)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_invalid_argument_is_not_retried(live_server):
    counting, aio_counting = Counting(), AioCounting()
    before = grpc_requests(live_server, "INVALID_ARGUMENT")
    with RerankClient(live_server.grpc_address, max_retries=4, interceptors=[counting]) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, DOCS, top_n=0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message == "top_n must be an integer >= 1, got 0"
    assert counting.attempts == 1
    assert e.value.request_id and re.fullmatch(r"[0-9a-f]+", e.value.request_id)  # trailing x-request-id

    async def call(c):
        return await c.rerank(QUERY, DOCS, top_n=0)
    with pytest.raises(RerankError) as e:
        arun(call, target=live_server.grpc_address, client_kwargs={"max_retries": 4, "interceptors": [aio_counting]})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and aio_counting.attempts == 1
    # nor NOT_FOUND (unknown model)
    with RerankClient(live_server.grpc_address, max_retries=4, interceptors=[counting]) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, DOCS, model="no-such-model")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and counting.attempts == 2
    assert grpc_requests(live_server, "INVALID_ARGUMENT") - before == 2  # what the server saw: once each


# A second server, with an API key. The client calls it while it is still starting, with
# wait_for_ready: the call waits through refused connections, then NOT_SERVING while the model
# loads (health-checked balancing sends it nowhere meanwhile), until the server serves.

@pytest.fixture(scope="module")
def auth_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("auth") / "server.log",
                          "--api-key", API_KEY, wait=False)
    counting = Counting()
    try:
        with RerankClient(server.grpc_address, api_key=API_KEY, timeout=120, wait_for_ready=True,
                          max_backoff=0.5, interceptors=[counting]) as c:
            server.first_call = (c.rerank(QUERY, DOCS), counting.attempts)
    except BaseException:
        server.stop()
        raise
    yield server
    assert server.stop() == 0, server.log()


@pytest.mark.slow  # starts a server of its own
def test_waits_until_the_server_starts(auth_server):
    response, calls = auth_server.first_call
    assert len(response.results) == len(DOCS) and calls == 1
    # the call reached the server once, when it served: none was refused while it loaded
    assert grpc_requests(auth_server, "UNAVAILABLE") == 0 and grpc_requests(auth_server, "OK") >= 1


@pytest.mark.slow  # starts a server of its own
def test_api_key(auth_server, live_server):
    with RerankClient(auth_server.grpc_address, api_key=API_KEY) as c:
        response = c.rerank(QUERY, DOCS)
        assert c.health() and c.health("rerank.v1.Rerank")
    with RerankClient(auth_server.grpc_address, max_retries=3) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, DOCS)
        assert c.health()  # health stays open
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization is required" in e.value.message
    with RerankClient(auth_server.grpc_address, api_key="wrong") as c, pytest.raises(RerankError) as e:
        c.rerank(QUERY, DOCS)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.message == "authorization: invalid API key"

    async def call(c):
        return await c.rerank(QUERY, DOCS), await c.health()
    aio_response, healthy = arun(call, target=auth_server.grpc_address, client_kwargs={"api_key": API_KEY})
    assert healthy
    # same checkpoint, same scores as on the open server
    expected = rest(auth_server, headers={"Authorization": f"Bearer {API_KEY}"})
    for r in (response, aio_response):
        assert [x.index for x in r.results] == [x["index"] for x in expected["results"]]
        assert [x.relevance_score for x in r.results] == pytest.approx(
            [x["relevance_score"] for x in expected["results"]], abs=1e-6)


def test_health(live_server, client):
    assert client.health() and client.health("rerank.v1.Rerank")
    assert not client.health("no.such.Service")
    with RerankClient("127.0.0.1:1", timeout=2) as c:  # nothing listens there
        assert not c.health()

    async def call(c):
        return await c.health()
    assert arun(call, target=live_server.grpc_address)


# The CLI.

def cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RERANK_API_KEY"} | (env or {})
    return subprocess.run([sys.executable, "-m", "rerank_client", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120, env=env)


def table_rows(stdout: str) -> list[tuple[int, int, float, str]]:
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "index", "score", "document"], stdout
    rows = []
    for line in lines[1:]:
        rank, index, score, text = line.split(maxsplit=3)
        rows.append((int(rank), int(index), float(score), text))
    return rows


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_cli_ranks(live_server, transport):
    where = ["--target", live_server.grpc_address] if transport == "grpc" else ["--url", live_server.http_url]
    expected = rest(live_server, top_n=3)["results"]
    run = cli(QUERY, *DOCS, "--top-n", "3", "--transport", transport, *where)
    assert run.returncode == 0, run.stderr
    rows = table_rows(run.stdout)
    assert [r[0] for r in rows] == [1, 2, 3]
    assert [r[1] for r in rows] == [r["index"] for r in expected]
    assert [r[2] for r in rows] == pytest.approx([r["relevance_score"] for r in expected], abs=2e-6)
    assert [r[3] for r in rows] == [DOCS[r["index"]][:80] for r in expected]

    # documents from stdin, JSON out: the server's response shape
    run = cli(QUERY, "--file", "-", "--json", "--return-documents", "--raw-scores", "--transport", transport,
              *where, stdin="\n".join(DOCS) + "\n\n")
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    expected = rest(live_server, return_documents=True, raw_scores=True)
    assert set(body) == set(expected) == {"object", "id", "model", "results", "usage", "created"}
    assert [r["index"] for r in body["results"]] == [r["index"] for r in expected["results"]]
    assert [r["document"] for r in body["results"]] == [DOCS[r["index"]] for r in expected["results"]]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx(
        [r["relevance_score"] for r in expected["results"]], abs=1e-6)


def test_cli_several_addresses(live_server):
    """A gRPC target and REST URLs naming a dead address beside the live server: both answer."""
    dead = free_port()
    expected = [r["index"] for r in rest(live_server)["results"]]
    for where in (["--target", f"ipv4:127.0.0.1:{dead},{live_server.grpc_address}"],
                  ["--transport", "http", "--url", f"http://127.0.0.1:{dead},{live_server.http_url}"]):
        for _ in range(3):  # a process starts at a random address: most likely one run starts at the dead one
            run = cli(QUERY, *DOCS, *where)
            assert run.returncode == 0, run.stderr
            assert [r[1] for r in table_rows(run.stdout)] == expected
    run = cli(QUERY, *DOCS, "--max-retries", "5")
    assert run.returncode == 2 and "--max-retries must be in 0..4" in run.stderr
    run = cli(QUERY, *DOCS, "--service-config", "{not json")
    assert run.returncode == 2 and "--service-config is not JSON" in run.stderr


def test_cli_file_and_long_documents(live_server, tmp_path):
    long_doc = "machine learning " * 20
    path = tmp_path / "docs.txt"
    path.write_text(f"{DOCS[0]}\n{long_doc}\n")
    run = cli(QUERY, DOCS[1], "--file", str(path), "--target", live_server.grpc_address)
    assert run.returncode == 0, run.stderr
    rows = table_rows(run.stdout)
    assert sorted(r[1] for r in rows) == [0, 1, 2]
    shown = {r[1]: r[3] for r in rows}
    assert shown[0] == DOCS[1] and shown[1] == DOCS[0]  # positional documents first, then the file's
    assert shown[2] == " ".join(long_doc.split())[:80] + "..."


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_cli_errors(live_server, auth_server, transport):
    def where(server):
        return ["--target", server.grpc_address] if transport == "grpc" else ["--url", server.http_url]
    run = cli(QUERY, *DOCS, "--model", "no-such-model", "--transport", transport, *where(live_server))
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip() == ("error: NOT_FOUND: model 'no-such-model' is not served here; "
                                  f"served: {SERVED_MODEL}, reranker")
    run = cli(QUERY, *DOCS, "--top-n", "0", "--transport", transport, *where(live_server))
    assert run.returncode == 1 and "INVALID_ARGUMENT: top_n must be an integer >= 1, got 0" in run.stderr
    # API key: missing, then from the environment, then as a flag
    run = cli(QUERY, *DOCS, "--transport", transport, *where(auth_server))
    assert run.returncode == 1 and "error: UNAUTHENTICATED: authorization is required" in run.stderr
    run = cli(QUERY, *DOCS, "--transport", transport, *where(auth_server), env={"RERANK_API_KEY": API_KEY})
    assert run.returncode == 0, run.stderr
    assert len(table_rows(run.stdout)) == len(DOCS)
    run = cli(QUERY, *DOCS, "--transport", transport, *where(auth_server), "--api-key", API_KEY, "--json")
    assert run.returncode == 0 and len(json.loads(run.stdout)["results"]) == len(DOCS)
    # no documents: a usage error
    run = cli(QUERY, "--transport", transport, *where(live_server))
    assert run.returncode == 2 and "no documents" in run.stderr
