"""Production serving against live server subprocesses (tiny random checkpoint, real tokenizer):
batching across concurrent requests, requests split over batches, cancellation, overload,
draining shutdown, API keys, request ids / timings / logs, and TLS.

Every wait is a poll on an observable state (``GET /metrics``, ``/health``, the process),
never a sleep. The slow requests use documents truncated to ``--max-length`` 2048 so every
pair has a known token count and a forward of two of them takes a noticeable time
(~0.2-1.5 s on a 2-core CPU).
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import math
import random
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    QUEUED,
    SERVED_MODEL,
    LiveServer,
    body,
    grpc_request,
    poll,
    post,
    scrape,
    sentence,
    start_server,
    stub,
)

from rerank_server.schema import pb

pytestmark = [pytest.mark.serving, pytest.mark.slow]

LONG = 2048  # --max-length of the servers that need slow forwards: long documents are cut to it
BIGGEST_REQUEST = 122 * LONG  # tokens: a request of batches_for's most (60 forwards of two LONG pairs), and one more


# ---------------------------------------------------------------- helpers

def documents(rng: random.Random, n: int) -> list[str]:
    """Sentence-length documents, 1 to 3 sentences each, all distinct."""
    return [" ".join(sentence(rng, rng.randint(6, 25)) for _ in range(rng.randint(1, 3))) + f" ({i})"
            for i in range(n)]


def long_document(seed: int) -> str:
    """Over LONG tokens (about 2600): truncated by the server to exactly fill a pair."""
    rng = random.Random(seed)
    return " ".join(sentence(rng, 20) for _ in range(125))


def rerank_ok(server: LiveServer, payload: dict, headers: dict | None = None) -> dict:
    r = post(server, payload, headers)
    assert r.status_code == 200, r.text
    return r.json()


FORWARDS, PAIRS, TOKENS = "rerank_batch_pairs_count", "rerank_batch_pairs_sum", "rerank_tokens_total"
GRPC_CANCELLED = 'rerank_requests_total{code="CANCELLED",http_status="",route="Rerank",transport="grpc"}'


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def wait_ready(*servers: LiveServer, url: str | None = None, verify=None, timeout: float = 180) -> None:
    """Waits for /health 200 on every server (started with wait=False)."""
    for server in servers:
        def healthy(server=server):
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
            try:
                return requests.get((url or server.http_url) + "/health", timeout=5, verify=verify).status_code == 200
            except requests.RequestException:
                return False
        poll(healthy, timeout, f"{server.http_url} to be ready", interval=0.1)


def stop_cleanly(*servers: LiveServer) -> None:
    for server in servers:
        assert server.stop(60) == 0, server.log()


def assert_same_answer(got: dict, alone: dict, tol: float = 1e-5) -> None:
    """Same scores (within ``tol``) per index, same order up to swaps of near-equal scores, same usage."""
    a = {r["index"]: r["relevance_score"] for r in got["results"]}
    b = {r["index"]: r["relevance_score"] for r in alone["results"]}
    assert a.keys() == b.keys()
    for i in a:
        assert math.isclose(a[i], b[i], rel_tol=0, abs_tol=tol), (i, a[i], b[i])
    order_a = [r["index"] for r in got["results"]]
    order_b = [r["index"] for r in alone["results"]]
    for x, y in zip(order_a, order_b, strict=True):
        assert x == y or abs(b[x] - b[y]) <= tol, (order_a, order_b)
    assert got["usage"] == alone["usage"]


_batch_seconds: dict[str, float] = {}


def batches_for(server: LiveServer, seconds: float, cap: int = 60) -> int:
    """How many full forwards (two LONG-token pairs each, on a server with --max-batch-tokens
    2 x LONG) take about ``seconds`` on this machine now: the forward's speed varies tenfold
    with the load of a shared 2-core machine, so the slow requests are sized by measuring it."""
    if server.http_url not in _batch_seconds:
        times = []
        for i in range(2):
            r = post(server, body("calibration", [long_document(900 + 2 * i), long_document(901 + 2 * i)]))
            assert r.status_code == 200, r.text
            times.append(float(r.headers["X-Inference-Time"]) / 1000)
        _batch_seconds[server.http_url] = min(times)
    return max(2, min(cap, math.ceil(seconds / _batch_seconds[server.http_url])))


def occupy(server: LiveServer, pool: ThreadPoolExecutor, batches: int, seed: int = 0):
    """Sends one request of ``2 x batches`` long documents (each a LONG-token pair) and returns its
    future once its first batch is in the forward and the rest waits in the queue."""
    docs = [long_document(seed + i) for i in range(2 * batches)]
    future = pool.submit(post, server, body("what occupies the model?", docs))
    poll(lambda: future.done() or scrape(server)[QUEUED] > 0, what="the big request to be in the forward")
    assert not future.done(), f"the big request finished before the test could queue behind it: {future.result().text}"
    return future


# ---------------------------------------------------------------- batching and cancellation

@pytest.fixture(scope="class")
def main_server(tiny_checkpoint, tmp_path_factory):
    """Slow-ish forwards (pairs up to LONG tokens, two per batch), JSON logs."""
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("main") / "server.log",
                          "--max-length", str(LONG), "--max-batch-tokens", str(2 * LONG), "--log-json",
                          "--max-request-tokens", str(BIGGEST_REQUEST))
    yield server
    stop_cleanly(server)


class TestBatching:
    def test_concurrent_requests_share_forwards_and_answer_as_alone(self, main_server):
        rng = random.Random(7)
        payloads = [body(f"question {i}: {sentence(rng, rng.randint(3, 10))}", documents(rng, rng.randint(2, 12)),
                         **({"top_n": 3} if i % 5 == 0 else {}), **({"raw_scores": True} if i % 7 == 0 else {}))
                    for i in range(30)]
        alone = [rerank_ok(main_server, p) for p in payloads]
        batches = batches_for(main_server, 1.5)

        with ThreadPoolExecutor(31) as pool:
            before = scrape(main_server)
            big = occupy(main_server, pool, batches)  # while it runs, the 30 requests queue up
            barrier = threading.Barrier(len(payloads))

            def send(p):
                barrier.wait()
                return post(main_server, p)
            replies = list(pool.map(send, payloads))
            assert big.result().status_code == 200
        after = scrape(main_server)

        for reply, reference in zip(replies, alone, strict=True):
            assert reply.status_code == 200, reply.text
            assert_same_answer(reply.json(), reference)
        pairs = sum(len(p["documents"]) for p in payloads)
        forwards = delta(after, before, FORWARDS) - batches  # less the big request's
        assert delta(after, before, PAIRS) == pairs + 2 * batches
        assert forwards < len(payloads), f"{forwards} forwards for {len(payloads)} concurrent requests"
        tokens = sum(r["usage"]["prompt_tokens"] for r in alone) + 2 * batches * LONG
        assert delta(after, before, TOKENS) == tokens

    def test_grpc_cancel_deadline_and_http_disconnect_drop_queued_pairs(self, main_server):
        """Three doomed requests wait behind a big one: a gRPC future that is cancelled, a gRPC
        call whose deadline passes, and a REST call whose connection closes. None of their
        tokens reach the model."""
        rng = random.Random(11)
        doomed = [(f"doomed {k}", documents(rng, n)) for k, n in ((0, 3), (1, 4), (2, 5))]
        sizes = [rerank_ok(main_server, body(q, d))["usage"]["prompt_tokens"] for q, d in doomed]
        assert sum(sizes) < LONG  # the queued tokens then read (LONG x k) + the doomed ones' sum

        batches = batches_for(main_server, 4.0)
        channel, client = stub(main_server)
        with channel, ThreadPoolExecutor(2) as pool:
            before = scrape(main_server)
            big = occupy(main_server, pool, batches)

            def queued_mod() -> int:
                return int(scrape(main_server)[QUEUED]) % LONG

            cancelled = client.Rerank.future(grpc_request(*doomed[0]))
            poll(lambda: queued_mod() == sizes[0], what="the cancelled gRPC call to be queued")
            raw = json.dumps(body(*doomed[1])).encode()
            host, port = main_server.http_url.removeprefix("http://").split(":")
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(raw), raw))
            poll(lambda: queued_mod() == sizes[0] + sizes[1], what="the REST call to be queued")
            deadline = client.Rerank.future(grpc_request(*doomed[2]), timeout=1.0)
            poll(lambda: deadline.done() or queued_mod() == sum(sizes),
                 what="the gRPC call with a deadline to be queued")
            assert queued_mod() == sum(sizes), "the deadline passed before the call was queued"

            cancelled.cancel()
            sock.close()
            with pytest.raises(grpc.RpcError) as e:
                deadline.result()
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert cancelled.cancelled()
            def both_gone():
                m = scrape(main_server)
                return delta(m, before, GRPC_CANCELLED) >= 2 and m
            seen = poll(both_gone, what="the server to see both gRPC calls go")
            # the doomed requests' pairs could only be taken after the big request's last forward
            assert delta(seen, before, FORWARDS) < batches, \
                "the big request ended before the doomed ones were gone: the test proves nothing"
            assert big.result().status_code == 200
            poll(lambda: scrape(main_server)[QUEUED] == 0, what="the queue to empty")

        after = scrape(main_server)
        assert delta(after, before, TOKENS) == 2 * batches * LONG, "a cancelled request's pairs were computed"
        assert delta(after, before, FORWARDS) == batches
        # and the server goes on serving
        follow = rerank_ok(main_server, body("still there?", ["yes", "no"]))
        assert delta(scrape(main_server), before, TOKENS) == 2 * batches * LONG + follow["usage"]["prompt_tokens"]


# ---------------------------------------------------------------- requests split across batches

@pytest.fixture(scope="class")
def split_servers(tiny_checkpoint, tmp_path_factory):
    """(small budget: 64 tokens a forward, two 32-token pairs at most; reference: one request per forward)."""
    logs = tmp_path_factory.mktemp("split")
    small = start_server(tiny_checkpoint, logs / "small.log", "--max-length", "32", "--max-batch-tokens", "64",
                         wait=False)
    reference = start_server(tiny_checkpoint, logs / "reference.log", "--max-length", "32", "--no-batching",
                             "--max-batch-tokens", "16384", wait=False)
    wait_ready(small, reference)
    yield small, reference
    stop_cleanly(small, reference)


class TestSplitAndNoBatching:
    def test_request_split_across_batches_scores_as_one_forward(self, split_servers):
        small, reference = split_servers
        rng = random.Random(3)
        docs = documents(rng, 9) + ["", "short", long_document(1)]
        for fields in ({}, {"raw_scores": True}, {"top_n": 4}):
            payload = body("how do rivers shape ancient cities?", docs, **fields)
            before = scrape(small)
            got = rerank_ok(small, payload)
            forwards = delta(scrape(small), before, FORWARDS)
            assert forwards >= math.ceil(got["usage"]["prompt_tokens"] / 64) and forwards >= len(docs) / 2
            want_before = scrape(reference)
            want = rerank_ok(reference, payload)
            assert delta(scrape(reference), want_before, FORWARDS) == 1
            assert_same_answer(got, want, tol=1e-4 if fields.get("raw_scores") else 1e-5)

    def test_concurrent_split_requests(self, split_servers):
        small, reference = split_servers
        rng = random.Random(5)
        payloads = [body(sentence(rng, 5), documents(rng, rng.randint(1, 7))) for _ in range(12)]
        with ThreadPoolExecutor(len(payloads)) as pool:
            got = list(pool.map(lambda p: post(small, p), payloads))
        for r, p in zip(got, payloads, strict=True):
            assert r.status_code == 200, r.text
            assert_same_answer(r.json(), rerank_ok(reference, p))

    def test_no_batching_is_one_request_per_forward(self, split_servers):
        _, reference = split_servers
        info = requests.get(reference.http_url + "/info", timeout=30).json()
        assert info["batching"] is False
        rng = random.Random(9)
        payloads = [body(sentence(rng, 6), documents(rng, rng.randint(2, 9))) for _ in range(10)]
        with ThreadPoolExecutor(len(payloads) + 1) as pool:
            before = scrape(reference)
            # 600 pairs of 32 tokens: two forwards (16384 + 2816 tokens) keep the model busy
            docs = [f"{i} " + " ".join(sentence(rng, 20) for _ in range(3)) for i in range(600)]  # cut to 32 tokens
            big = pool.submit(post, reference, body("busy", docs))
            poll(lambda: big.done() or scrape(reference)[QUEUED] > 0, what="the big request to be in the forward")
            replies = list(pool.map(lambda p: post(reference, p), payloads))
            assert big.result().status_code == 200
        assert all(r.status_code == 200 for r in replies)
        assert delta(scrape(reference), before, FORWARDS) == 2 + len(payloads)


# ---------------------------------------------------------------- overload

@pytest.fixture(scope="class")
def small_queue_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("overload") / "server.log",
                          "--max-length", str(LONG), "--max-batch-tokens", str(2 * LONG),
                          "--max-queued-tokens", str(BIGGEST_REQUEST), "--max-request-tokens", str(BIGGEST_REQUEST))
    yield server
    stop_cleanly(server)


class TestOverload:
    def test_flood_gets_fast_429_and_resource_exhausted_then_recovers(self, small_queue_server):
        """A big request of exactly --max-queued-tokens (accepted: the queue was empty) keeps all
        but its first batch waiting; of a flood of concurrent requests of 2 x LONG tokens each,
        at most the first fits, the rest meet a full queue."""
        server = small_queue_server
        n_rest, n_grpc = 12, 6
        payloads = [body(f"flood {i}", [long_document(100 + 2 * i), long_document(101 + 2 * i)])
                    for i in range(n_rest + n_grpc)]
        channel, client = stub(server)
        barrier = threading.Barrier(n_rest + n_grpc)

        def rest(p):
            barrier.wait()
            t0 = time.perf_counter()
            r = post(server, p)
            return r, time.perf_counter() - t0

        def call(p):
            barrier.wait()
            t0 = time.perf_counter()
            try:
                client.Rerank(grpc_request(p["query"], p["documents"]), timeout=120)
                return grpc.StatusCode.OK, "", time.perf_counter() - t0
            except grpc.RpcError as e:
                return e.code(), e.details(), time.perf_counter() - t0

        before = scrape(server)
        with channel, ThreadPoolExecutor(n_rest + n_grpc + 1) as pool:
            big = occupy(server, pool, BIGGEST_REQUEST // (2 * LONG))
            rest_futures = [pool.submit(rest, p) for p in payloads[:n_rest]]
            grpc_futures = [pool.submit(call, p) for p in payloads[n_rest:]]
            rest_results = [f.result() for f in rest_futures]
            grpc_results = [f.result() for f in grpc_futures]
            big = big.result()
        assert big.status_code == 200, big.text
        big_inference = float(big.headers["X-Inference-Time"]) / 1000

        refused = [(r, t) for r, t in rest_results if r.status_code == 429]
        assert all(r.status_code in (200, 429) for r, _ in rest_results), [r.text for r, _ in rest_results]
        grpc_refused = [(d, t) for c, d, t in grpc_results if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert all(c in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED) for c, _, _ in grpc_results), \
            grpc_results
        assert refused and grpc_refused, "nothing was refused: the queue limit did not bite"
        for r, _ in refused:
            error = r.json()
            assert error["code"] == 8 and "queued" in error["message"] and "retry" in error["message"], error
        for details, _ in grpc_refused:
            assert "queued" in details and "retry" in details
        after = scrape(server)
        # the same code label on both transports (the gRPC name), the HTTP status beside it
        assert delta(after, before, 'rerank_requests_total{code="RESOURCE_EXHAUSTED",http_status="429",'
                                    'route="/v1/rerank",transport="http"}') == len(refused)
        assert delta(after, before, 'rerank_requests_total{code="RESOURCE_EXHAUSTED",http_status="",'
                                    'route="Rerank",transport="grpc"}') == len(grpc_refused)
        assert not [k for k in after if k.startswith("rerank_requests_total{") and
                    any(f'route="{p}"' in k for p in ("/health", "/metrics", "/info", "/docs", "/openapi.json"))], \
            "probes are not counted as rerank requests"
        # refusals come at once: a refused client does not wait for the queue
        latencies = sorted([t for _, t in refused] + [t for _, t in grpc_refused])
        median = latencies[len(latencies) // 2]
        assert median < 0.5 * big_inference, \
            f"median refusal {median:.3f} s vs {big_inference:.3f} s of forwards for the queued request"

        poll(lambda: scrape(server)[QUEUED] == 0, what="the queue to drain")
        rerank_ok(server, body("after the flood", ["calm", "water"]))


# ---------------------------------------------------------------- draining shutdown

def test_sigterm_finishes_in_flight_requests_then_exits_0(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "server.log", "--max-length", str(LONG),
                          "--max-batch-tokens", str(2 * LONG), "--shutdown-grace", "120",
                          "--max-request-tokens", str(BIGGEST_REQUEST))
    try:
        n_rest, n_grpc = 3, 2
        n = n_rest + n_grpc
        k = batches_for(server, 0.6)  # full forwards per request
        channel, client = stub(server)
        docs = [[long_document(2 * k * i + j) for j in range(2 * k)] for i in range(n)]
        before = scrape(server)
        with channel, ThreadPoolExecutor(n) as pool:
            rest = [pool.submit(post, server, body(f"slow {i}", docs[i])) for i in range(n_rest)]
            calls = [client.Rerank.future(grpc_request(f"slow {i}", docs[i]), timeout=300) for i in range(n_rest, n)]

            def all_accepted():
                # every forward is two pairs of one request, so once all are accepted each of the
                # n x k forwards is done, running (one at a time) or queued
                m = scrape(server)
                forwards = delta(m, before, FORWARDS)
                return m[QUEUED] / (2 * LONG) + forwards + 1 == n * k and forwards < n * k
            poll(all_accepted, what="all requests to be accepted, some still queued")
            server.process.send_signal(signal.SIGTERM)

            # while draining the listeners stay open: /health answers 503 (never a refused
            # connection), and a new request is refused with 503 / UNAVAILABLE, not queued
            poll(lambda: requests.get(server.http_url + "/health", timeout=5).status_code == 503,
                 what="/health to answer 503")
            late = post(server, body("late", ["too late"]), timeout=30)
            assert late.status_code == 503 and "shutting down" in late.json()["message"], late.text
            with pytest.raises(grpc.RpcError) as e:
                client.Rerank(grpc_request("late", ["too late"]), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
            for f in rest:
                r = f.result()
                assert r.status_code == 200, r.text
                assert len(r.json()["results"]) == 2 * k
            for c in calls:
                assert len(c.result().results) == 2 * k
        assert server.process.wait(120) == 0, server.log()
        assert "stopped" in server.log()
        assert re.search(rf"drained: {n} of {n} accepted requests finished, 0 cut", server.log()), server.log()
    finally:
        if server.process.poll() is None:
            server.process.kill()


# ---------------------------------------------------------------- auth

KEY1, KEY2 = "k1-7f3a9c51d2", "k2-0be44a6e19"
ENV_KEYS = ("envkey-a-58d1", "envkey-b-c07e")


@pytest.fixture(scope="class")
def auth_servers(tiny_checkpoint, tmp_path_factory):
    """(flags --api-key x2, metrics open; env RERANK_API_KEY=a,b with --metrics-auth)."""
    logs = tmp_path_factory.mktemp("auth")
    flags = start_server(tiny_checkpoint, logs / "flags.log", "--api-key", KEY1, "--api-key", KEY2,
                         "--max-length", "64", wait=False)
    env = start_server(tiny_checkpoint, logs / "env.log", "--metrics-auth", "--max-length", "64", wait=False,
                       env={"RERANK_API_KEY": f"{ENV_KEYS[0]}, {ENV_KEYS[1]}"})
    wait_ready(flags, env)
    yield flags, env
    stop_cleanly(flags, env)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


PAYLOAD = body("which is wet?", ["water", "sand", "fire"])


class TestAuth:
    def check_rest(self, server, good_keys):
        for headers in ({}, bearer("nope"), {"Authorization": good_keys[0]}, {"Authorization": f"Basic {good_keys[0]}"},
                        bearer(good_keys[0] + "x"), bearer(",".join(good_keys))):
            r = post(server, PAYLOAD, headers)
            assert r.status_code == 401, (headers, r.text)
            error = r.json()
            assert error["code"] == 16 and error["message"], error
        for key in good_keys:
            assert rerank_ok(server, PAYLOAD, bearer(key))["results"]
        r = requests.get(server.http_url + "/health", timeout=30)
        assert r.status_code == 200

    def check_grpc(self, server, good_keys):
        channel, client = stub(server)
        with channel:
            request = grpc_request(PAYLOAD["query"], PAYLOAD["documents"])
            for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", good_keys[0]),)):
                with pytest.raises(grpc.RpcError) as e:
                    client.Rerank(request, metadata=metadata, timeout=60)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert e.value.details()
            for key in good_keys:
                reply = client.Rerank(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
                assert len(reply.results) == 3
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

    def test_keys_from_flags(self, auth_servers):
        server, _ = auth_servers
        self.check_rest(server, [KEY1, KEY2])
        self.check_grpc(server, [KEY1, KEY2])
        assert scrape(server)["rerank_tokens_total"] > 0  # /metrics open without --metrics-auth

    def test_keys_from_environment_and_metrics_auth(self, auth_servers):
        _, server = auth_servers
        self.check_rest(server, list(ENV_KEYS))
        self.check_grpc(server, list(ENV_KEYS))
        r = requests.get(server.http_url + "/metrics", timeout=30)
        assert r.status_code == 401 and r.json()["code"] == 16
        assert scrape(server, bearer(ENV_KEYS[1]))["rerank_tokens_total"] > 0

    def test_keys_never_logged(self, auth_servers):
        for server, key in zip(auth_servers, (KEY2, ENV_KEYS[0]), strict=True):
            assert post(server, PAYLOAD, bearer(key + "-wrong")).status_code == 401
            rerank_ok(server, PAYLOAD, bearer(key))
            channel, client = stub(server)
            with channel:
                client.Rerank(grpc_request("q", ["d"]), metadata=(("authorization", f"Bearer {key}"),), timeout=60)
            def logged(server=server):
                text = server.log()
                return "/v1/rerank 200" in text and "gRPC Rerank OK" in text and text
            log = poll(logged, timeout=30, what="the requests to be logged")
            assert "/v1/rerank 401" in log
            for secret in (KEY1, KEY2, *ENV_KEYS):
                assert secret not in log


# ---------------------------------------------------------------- observability

class TestObservability:
    def test_request_id_generated_echoed_and_logged(self, main_server):
        r = post(main_server, PAYLOAD)
        assert r.status_code == 200
        generated = r.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        assert r.json()["id"] == f"rerank-{generated}"

        mine = "client-req-0042"
        r = post(main_server, PAYLOAD, {"X-Request-Id": mine})
        assert r.status_code == 200
        assert r.headers["X-Request-Id"] == mine and r.json()["id"] == f"rerank-{mine}"
        r = post(main_server, {**PAYLOAD, "model": "no-such-model"}, {"X-Request-Id": "client-req-0043"})
        assert r.status_code == 404 and r.headers["X-Request-Id"] == "client-req-0043"

        def logged(request_id):
            return [e for e in map(json.loads, main_server.log().splitlines()) if e["request_id"] == request_id]
        for request_id in (generated, mine, "client-req-0043"):
            entries = poll(lambda request_id=request_id: logged(request_id), timeout=30,
                           what=f"a log line for {request_id}")
            assert any("/v1/rerank" in e["message"] for e in entries), entries

    @pytest.mark.parametrize("bad_id", ["caf\xe9", "x" * 300, "two words"])
    def test_unusable_request_id_is_replaced(self, main_server, bad_id):
        r = post(main_server, PAYLOAD, {"X-Request-Id": bad_id})
        assert r.status_code == 200, r.text
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
        assert r.json()["id"] == "rerank-" + r.headers["X-Request-Id"]

    def test_stage_timing_headers(self, main_server):
        r = post(main_server, PAYLOAD)
        assert r.status_code == 200
        for stage in ("Tokenize", "Queue", "Inference"):
            value = float(r.headers[f"X-{stage}-Time"])  # milliseconds
            assert 0 <= value < 120_000, (stage, value)
        assert float(r.headers["X-Inference-Time"]) > 0

    def test_grpc_trailing_metadata(self, main_server):
        channel, client = stub(main_server)
        with channel:
            request = grpc_request(PAYLOAD["query"], PAYLOAD["documents"])
            response, call = client.Rerank.with_call(request, timeout=60)
            trailers = dict(call.trailing_metadata())
            assert re.fullmatch(r"[0-9a-f]{32}", trailers["x-request-id"])
            assert response.id == "rerank-" + trailers["x-request-id"]
            assert float(trailers["x-inference-time"]) > 0 and float(trailers["x-queue-time"]) >= 0
            response, call = client.Rerank.with_call(request, metadata=(("x-request-id", "grpc-req-7"),), timeout=60)
            assert dict(call.trailing_metadata())["x-request-id"] == "grpc-req-7"
            assert response.id == "rerank-grpc-req-7"
            with pytest.raises(grpc.RpcError) as e:  # errors carry it too
                client.Rerank(pb.RerankRequest(model=SERVED_MODEL, query="q"),
                              metadata=(("x-request-id", "grpc-req-8"),))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(e.value.trailing_metadata())["x-request-id"] == "grpc-req-8"
        entries = [json.loads(line) for line in main_server.log().splitlines()]
        assert any(e["request_id"] == "grpc-req-7" and "OK" in e["message"] for e in entries)

    def test_info(self, main_server):
        info = requests.get(main_server.http_url + "/info", timeout=30).json()
        assert info["model"] == SERVED_MODEL and "reranker" in info["aliases"]
        assert info["device"] == "cpu" and info["dtype"] == "float32"
        assert info["attention_backend"] and isinstance(info["attention_backend"], str)
        assert info["max_length"] == LONG and info["max_batch_tokens"] == 2 * LONG
        assert info["max_queued_tokens"] > 0 and info["max_documents"] > 0 and info["max_request_bytes"] > 0
        assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])
        assert info["batching"] is True and info["auth"] is False and info["tls"] is False

    def test_log_json_lines(self, main_server):
        lines = main_server.log().splitlines()
        assert len(lines) > 5
        for line in lines:
            entry = json.loads(line)  # every line, not only ours
            assert {"time", "level", "logger", "request_id", "message"} <= entry.keys(), entry
        assert any(json.loads(line)["message"].startswith("serving model") for line in lines)


# ---------------------------------------------------------------- TLS

def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_on_both_transports(tiny_checkpoint, tmp_path):
    cert, key = self_signed(tmp_path, "server")
    other, _ = self_signed(tmp_path, "other")
    server = start_server(tiny_checkpoint, tmp_path / "server.log", "--tls-cert", str(cert), "--tls-key", str(key),
                          "--max-length", "64", wait=False)
    https = server.http_url.replace("http://", "https://")
    try:
        wait_ready(server, url=https, verify=str(cert))
        r = requests.post(https + "/v1/rerank", json=PAYLOAD, verify=str(cert), timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 3
        assert requests.get(https + "/info", verify=str(cert), timeout=30).json()["tls"] is True
        with pytest.raises(requests.exceptions.SSLError):  # a client trusting another certificate refuses it
            requests.get(https + "/health", verify=str(other), timeout=30)
        with pytest.raises(requests.ConnectionError):  # no plain HTTP on the TLS port
            requests.get(server.http_url + "/health", timeout=30)

        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel, client = stub(server, credentials)
        with channel:
            response = client.Rerank(grpc_request(PAYLOAD["query"], PAYLOAD["documents"]), timeout=60)
            assert len(response.results) == 3
        insecure, client = stub(server)
        with insecure, pytest.raises(grpc.RpcError) as e:
            client.Rerank(grpc_request("q", ["d"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_cleanly(server)
