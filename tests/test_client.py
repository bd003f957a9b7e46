"""rerank_client against live servers: the sync and async gRPC clients agree with REST, typed
results, documents round-trip, deadlines, retries (UNAVAILABLE only, bounded, within the
deadline), API keys, health, and the ``python -m rerank_client`` CLI over both transports."""
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
from helpers import DOCS, QUERY, ROOT, SERVED_MODEL, start_server

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


# Interceptors: count attempts, and fail the first N with UNAVAILABLE before they leave the client.

class _Unavailable(grpc.RpcError, grpc.Call, grpc.Future):
    """What a failed call looks like to a sync interceptor (cf. grpc._interceptor._FailureOutcome)."""

    def code(self): return grpc.StatusCode.UNAVAILABLE
    def details(self): return "injected: connection reset"
    def result(self, timeout=None): raise self
    def exception(self, timeout=None): return self
    def traceback(self, timeout=None): return None
    def initial_metadata(self): return ()
    def trailing_metadata(self): return ()
    def is_active(self): return False
    def time_remaining(self): return None
    def cancel(self): return False
    def cancelled(self): return False
    def running(self): return False
    def done(self): return True
    def add_callback(self, callback): return False
    def add_done_callback(self, fn): fn(self)


class Flaky(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, failures: int = 0):
        self.failures, self.times, self.codes = failures, [], []

    @property
    def attempts(self) -> int:
        return len(self.times)

    def intercept_unary_unary(self, continuation, details, request):
        self.times.append(time.monotonic())
        outcome = _Unavailable() if self.attempts <= self.failures else continuation(details, request)
        self.codes.append(outcome.code())
        return outcome


class AioFlaky(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, failures: int = 0):
        self.failures, self.times = failures, []

    @property
    def attempts(self) -> int:
        return len(self.times)

    async def intercept_unary_unary(self, continuation, details, request):
        self.times.append(time.monotonic())
        if self.attempts <= self.failures:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="injected: connection reset")
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
    flaky = Flaky()
    with RerankClient(live_server.grpc_address, timeout=0.001, max_retries=5, interceptors=[flaky]) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, BIG)  # the constructor's default deadline
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.value.attempts == 1
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, BIG, timeout=0.0001)  # a per-call deadline
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert flaky.attempts == 2  # not retried
        assert len(c.rerank(QUERY, BIG, timeout=60).results) == 50

    async def call(c):
        return await c.rerank(QUERY, BIG, timeout=0.001)
    with pytest.raises(RerankError) as e:
        arun(call, target=live_server.grpc_address)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_invalid_argument_is_not_retried(live_server):
    flaky, aio_flaky = Flaky(), AioFlaky()
    before = grpc_requests(live_server, "INVALID_ARGUMENT")
    with RerankClient(live_server.grpc_address, max_retries=5, interceptors=[flaky]) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, DOCS, top_n=0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message == "top_n must be an integer >= 1, got 0"
    assert e.value.attempts == 1 and flaky.attempts == 1
    assert e.value.request_id and re.fullmatch(r"[0-9a-f]+", e.value.request_id)  # trailing x-request-id

    async def call(c):
        return await c.rerank(QUERY, DOCS, top_n=0)
    with pytest.raises(RerankError) as e:
        arun(call, target=live_server.grpc_address, client_kwargs={"max_retries": 5, "interceptors": [aio_flaky]})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and aio_flaky.attempts == 1
    # nor NOT_FOUND (unknown model)
    with RerankClient(live_server.grpc_address, max_retries=5, interceptors=[flaky]) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, DOCS, model="no-such-model")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and flaky.attempts == 2
    assert grpc_requests(live_server, "INVALID_ARGUMENT") - before == 2  # what the server saw: once each


def test_retries_unavailable_with_backoff(live_server, client):
    flaky = Flaky(failures=3)
    with RerankClient(live_server.grpc_address, timeout=30, max_retries=4, initial_backoff=0.05,
                      interceptors=[flaky]) as c:
        response = c.rerank(QUERY, DOCS)
    assert flaky.codes == [grpc.StatusCode.UNAVAILABLE] * 3 + [grpc.StatusCode.OK]
    assert [r.index for r in response.results] == [r.index for r in client.rerank(QUERY, DOCS).results]
    gaps = [b - a for a, b in zip(flaky.times, flaky.times[1:], strict=False)]  # between neighbours
    # exponential with jitter: in [cap/2, cap], cap = 0.05 * 2^attempt. A sleep never ends early, so
    # the lower bound (the growth) is exact; it can end late on a loaded machine: a second of slack
    for attempt, gap in enumerate(gaps):
        assert 0.05 * 2 ** attempt / 2 <= gap <= 0.05 * 2 ** attempt + 1.0, gaps

    aio_flaky = AioFlaky(failures=2)

    async def call(c):
        return await c.rerank(QUERY, DOCS)
    response = arun(call, target=live_server.grpc_address,
                    client_kwargs={"initial_backoff": 0.05, "interceptors": [aio_flaky]})
    assert aio_flaky.attempts == 3 and len(response.results) == len(DOCS)


def test_retries_are_bounded(live_server):
    flaky = Flaky(failures=1000)
    with RerankClient(live_server.grpc_address, max_retries=2, initial_backoff=0.01, interceptors=[flaky]) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, DOCS)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.message == "injected: connection reset"
    assert e.value.attempts == flaky.attempts == 3
    # by the deadline: no retry is started that could not finish before it
    flaky = Flaky(failures=1000)
    with RerankClient(live_server.grpc_address, timeout=1.0, max_retries=1000, initial_backoff=0.05,
                      max_backoff=0.4, interceptors=[flaky]) as c:
        started = time.monotonic()
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, DOCS)
        elapsed = time.monotonic() - started
    # the deadline stopped it (1000 retries at up to 0.4 s would take minutes), and with the last
    # UNAVAILABLE, not DEADLINE_EXCEEDED: no attempt ran into the deadline. The wall-clock bound
    # leaves a loaded machine two seconds of slack past the 1 s deadline.
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert 3 <= flaky.attempts < 20 and elapsed < 1.0 + 2.0, (flaky.attempts, elapsed)

    aio_flaky = AioFlaky(failures=1000)

    async def call(c):
        return await c.rerank(QUERY, DOCS)
    with pytest.raises(RerankError) as e:
        arun(call, target=live_server.grpc_address,
             client_kwargs={"max_retries": 3, "initial_backoff": 0.01, "interceptors": [aio_flaky]})
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and aio_flaky.attempts == 4


# A second server, with an API key. The client calls it while it is still starting: refused
# connections, then UNAVAILABLE while the model loads, are retried until it serves.

@pytest.fixture(scope="module")
def auth_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("auth") / "server.log",
                          "--api-key", API_KEY, wait=False)
    flaky = Flaky()
    started = time.monotonic()
    try:
        with RerankClient(server.grpc_address, api_key=API_KEY, timeout=120, max_retries=10_000,
                          initial_backoff=0.05, max_backoff=0.5, interceptors=[flaky]) as c:
            server.first_call = (c.rerank(QUERY, DOCS), flaky.codes, time.monotonic() - started)
    except BaseException:
        server.stop()
        raise
    yield server
    assert server.stop() == 0, server.log()


@pytest.mark.slow  # starts a server of its own
def test_retries_until_the_server_starts(auth_server):
    response, codes, elapsed = auth_server.first_call
    assert len(response.results) == len(DOCS) and elapsed < 120
    assert len(codes) > 1 and codes[-1] == grpc.StatusCode.OK
    assert set(codes[:-1]) == {grpc.StatusCode.UNAVAILABLE}


@pytest.mark.slow  # starts a server of its own
def test_api_key(auth_server, live_server):
    with RerankClient(auth_server.grpc_address, api_key=API_KEY) as c:
        response = c.rerank(QUERY, DOCS)
        assert c.health() and c.health("rerank.v1.Rerank")
    with RerankClient(auth_server.grpc_address, max_retries=3) as c:
        with pytest.raises(RerankError) as e:
            c.rerank(QUERY, DOCS)
        assert c.health()  # health stays open
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.attempts == 1
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
