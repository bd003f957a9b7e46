"""rerank_client over several servers, against small in-process gRPC and HTTP replicas (each
answers a score that names it, counts what it received, and can be told to fail or to report
NOT_SERVING): round_robin spreads calls, a NOT_SERVING replica gets none, UNAVAILABLE is retried
by gRPC's retry policy on another replica (bounded; nothing else retried), wait_for_ready waits
for a serving one, the service config is overridable, the REST transport fails over on a refused
connection or 503, and the client's keepalive is one the server allows. The same with real
servers, kills and drains: tests/test_scaleout.py."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helpers import free_port, poll

from rerank_client import AsyncRerankClient, RerankClient, RerankError, build_request, build_service_config, pb, pb_grpc
from rerank_client.client import KEEPALIVE_OPTIONS, MAX_RETRIES
from rerank_client.http import post_rerank
from rerank_server.grpc_server import KEEPALIVE_OPTIONS as SERVER_KEEPALIVE


class Replica(pb_grpc.RerankServicer):
    """A gRPC server on 127.0.0.1 whose Rerank answers one result scored ``number``; ``fail``:
    the status code every call is aborted with instead (None: answer)."""

    def __init__(self, number: int):
        self.number, self.calls, self.fail = number, 0, None
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_RerankServicer_to_server(self, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.set_serving(True)
        self.server.start()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", "rerank.v1.Rerank"):
            self.health.set(name, status)

    def Rerank(self, request, context):
        with self.lock:
            self.calls += 1
        if self.fail is not None:
            context.abort(self.fail, f"replica {self.number}: injected {self.fail.name}")
        return pb.RerankResponse(model=request.model, results=[pb.RerankResult(index=0, relevance_score=self.number)])


@pytest.fixture
def replicas():
    started = [Replica(n) for n in range(3)]
    yield started
    for r in started:
        r.server.stop(0)


def target(replicas) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)


def answered_by(client: RerankClient) -> int:
    return int(client.rerank("q", ["d"]).results[0].relevance_score)


def test_round_robin_spreads_calls_over_every_replica(replicas):
    with RerankClient(target(replicas), timeout=10) as client:
        answers = [answered_by(client) for _ in range(60)]
    counts = [r.calls for r in replicas]
    print("calls per replica:", counts)
    assert sum(counts) == 60 and [answers.count(n) for n in range(3)] == counts
    assert min(counts) >= 10, counts  # each its share (the first calls may all go to the first one connected)


def test_pick_first_and_a_service_config_of_ones_own(replicas):
    with RerankClient(target(replicas), timeout=10, load_balancing="pick_first") as client:
        assert {answered_by(client) for _ in range(20)} == {0}
    config = {"loadBalancingConfig": [{"pick_first": {}}]}
    with RerankClient(target(replicas), timeout=10, service_config=json.dumps(config)) as client:
        assert {answered_by(client) for _ in range(20)} == {0}
        assert json.loads(client.service_config) == config


def test_a_not_serving_replica_gets_no_new_calls(replicas):
    with RerankClient(target(replicas), timeout=10) as client:
        assert {answered_by(client) for _ in range(30)} == {0, 1, 2}
        replicas[1].set_serving(False)  # as a draining server does: its health watchers are told at once

        def thirty_without_it():
            before = replicas[1].calls
            answers = {answered_by(client) for _ in range(30)}
            return replicas[1].calls == before and answers == {0, 2}
        poll(thirty_without_it, timeout=10, what="30 calls in a row none of which reached the NOT_SERVING replica")
        replicas[1].set_serving(True)
        poll(lambda: answered_by(client) == 1, timeout=10, what="the replica serving again to get calls")


def test_unavailable_is_retried_on_another_replica(replicas):
    replicas[0].fail = grpc.StatusCode.UNAVAILABLE  # still SERVING by health: only the retries save the calls
    with RerankClient(target(replicas), timeout=10, initial_backoff=0.01) as client:
        answers = [answered_by(client) for _ in range(30)]
    assert 0 not in answers and len(answers) == 30
    assert replicas[0].calls >= 5, replicas[0].calls  # it did get attempts, each retried elsewhere
    assert replicas[1].calls + replicas[2].calls == 30  # and every call was answered exactly once


def test_retries_are_bounded_and_unavailable_only():
    replica = Replica(0)
    try:
        replica.fail = grpc.StatusCode.UNAVAILABLE
        for max_retries in (0, 2, MAX_RETRIES):
            before = replica.calls
            with RerankClient(f"127.0.0.1:{replica.port}", timeout=10, max_retries=max_retries,
                              initial_backoff=0.01) as client:
                with pytest.raises(RerankError) as e:
                    client.rerank("q", ["d"])
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "injected" in e.value.message
            assert replica.calls - before == max_retries + 1
        for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL):
            replica.fail, before = code, replica.calls
            with RerankClient(f"127.0.0.1:{replica.port}", timeout=10) as client:
                with pytest.raises(RerankError) as e:
                    client.rerank("q", ["d"])
            assert e.value.code == code and replica.calls - before == 1, code
        # the retries stay within the deadline: a long backoff ends in DEADLINE_EXCEEDED, not past it
        replica.fail = grpc.StatusCode.UNAVAILABLE
        with RerankClient(f"127.0.0.1:{replica.port}", timeout=0.5, initial_backoff=5, max_backoff=5) as client:
            with pytest.raises(RerankError) as e:
                client.rerank("q", ["d"])
        assert e.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    finally:
        replica.server.stop(0)
    with pytest.raises(ValueError, match="max_retries"):
        RerankClient("127.0.0.1:1", max_retries=MAX_RETRIES + 1)
    with pytest.raises(ValueError, match="backoff"):
        build_service_config(initial_backoff=1, max_backoff=0.5)


def test_async_client_balances_and_retries(replicas):
    replicas[2].fail = grpc.StatusCode.UNAVAILABLE

    async def main():
        async with AsyncRerankClient(target(replicas), timeout=10, initial_backoff=0.01) as client:
            # one by one until both good replicas have answered (the first calls go to the first
            # connection that is ready), then 40 at once
            seen = set()
            for _ in range(100):
                seen.add(int((await client.rerank("q", ["d"])).results[0].relevance_score))
                if seen == {0, 1}:
                    break
            replies = await asyncio.gather(*(client.rerank("q", ["d"]) for _ in range(40)))
        return seen, [int(r.results[0].relevance_score) for r in replies]
    seen, answers = asyncio.run(main())
    assert seen == {0, 1} and len(answers) == 40 and set(answers) == {0, 1}, answers
    assert replicas[2].calls > 0  # tried, and retried elsewhere


def test_wait_for_ready_waits_for_a_serving_replica():
    replica = Replica(7)
    try:
        replica.set_serving(False)  # as while a server loads its model
        with RerankClient(f"127.0.0.1:{replica.port}", timeout=10, initial_backoff=0.01) as client:
            with pytest.raises(RerankError) as e:  # fails fast, without reaching it
                client.rerank("q", ["d"])
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and replica.calls == 0
        threading.Timer(0.5, replica.set_serving, (True,)).start()
        with RerankClient(f"127.0.0.1:{replica.port}", timeout=10, wait_for_ready=True) as client:
            started = time.monotonic()
            assert answered_by(client) == 7
            assert time.monotonic() - started >= 0.4 and replica.calls == 1  # waited, then one call
    finally:
        replica.server.stop(0)


def test_client_keepalive_is_one_the_server_allows():
    client, server = dict(KEEPALIVE_OPTIONS), dict(SERVER_KEEPALIVE)
    # a client pinging more often than the server's minimum gets GOAWAY "too_many_pings"
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    # idle connections too: the client pings without calls, the server permits it
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 1


# ---------------------------------------------------------------- REST failover

class _HttpReplica(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.server.calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.server.answer
        data = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_replicas():
    started = []
    for answer in ((503, "<html>no upstream</html>"),  # a proxy's 503 page
                   (503, {"code": 14, "message": "the server is shutting down"}),
                   (200, {"id": "x", "model": "m", "results": [{"index": 0, "relevance_score": 0.5}]}),
                   (400, {"code": 3, "message": "top_n must be an integer >= 1, got 0"})):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _HttpReplica)
        server.calls, server.answer = 0, answer
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in started], started
    for s in started:
        s.shutdown()
        s.server_close()


def test_rest_fails_over_on_refused_connections_and_503(http_replicas):
    urls, servers = http_replicas
    refused = f"http://127.0.0.1:{free_port()}"
    request = build_request("q", ["d"])
    for _ in range(6):  # whichever address a call starts at, the two 503s and the refusal are skipped
        body = post_rerank([refused, urls[0], urls[1], urls[2]], request, initial_backoff=0.001)
        assert body["results"][0]["relevance_score"] == 0.5
    assert servers[2].calls == 6 and servers[0].calls >= 1 and servers[1].calls >= 1
    with pytest.raises(RerankError) as e:  # bounded: every address fails
        post_rerank(",".join([refused, urls[0], urls[1]]), request, max_retries=2, initial_backoff=0.001)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    before = servers[3].calls
    with pytest.raises(RerankError) as e:  # a client error is not retried
        post_rerank(urls[3], request, max_retries=4)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_n" in e.value.message
    assert servers[3].calls - before == 1
