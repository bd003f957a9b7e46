"""SIGTERM/SIGINT as the README promises: during the drain both listeners keep answering
(health NOT_SERVING / 503, new requests 503 / UNAVAILABLE), accepted requests finish within
--shutdown-grace, those still running then are answered 503 / UNAVAILABLE (never a reset or
an empty reply), the log counts both, the process exits 0 soon after; a second signal exits
at once. Real processes, real signals, real ports; the small model with
256-token pairs, so that a few hundred short documents outlast the grace."""
from __future__ import annotations

import math
import random
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import QUEUED, body, grpc_request, poll, post, scrape, sentence, start_server, stub

pytestmark = [pytest.mark.serving, pytest.mark.slow]

GRACE = 4.0  # against the quick request's 0.8 s of forwards: room for a loaded machine's slower ones
PAIR = 256  # --max-length: every document below is cut to it; two pairs fill a batch


def document(seed: int) -> str:
    """About 350 tokens: cut by the server to exactly PAIR."""
    rng = random.Random(seed)
    return " ".join(sentence(rng, 20) for _ in range(15))


def slow_docs(k: int, seed: int) -> list[str]:
    return [document(seed + j) for j in range(2 * k)]  # k full forwards of two pairs


def start(checkpoint, log, *extra):
    # --max-documents and --max-request-tokens: on a fast CPU a slow request needs more than the
    # default 1000 documents and 32 batches
    return start_server(checkpoint, log, "--max-length", str(PAIR), "--max-batch-tokens", str(2 * PAIR),
                        "--max-documents", "100000", "--max-request-tokens", "2000000", *extra)


_forward_seconds: dict[str, float] = {}  # per server


def forwards_for(server, seconds: float) -> int:
    """How many full forwards take about ``seconds`` on this machine now (measured)."""
    if server.http_url not in _forward_seconds:
        times = []
        for i in range(3):
            r = post(server, body("calibration", slow_docs(1, 900 + 2 * i)))
            assert r.status_code == 200, r.text
            times.append(float(r.headers["X-Inference-Time"]) / 1000)
        _forward_seconds[server.http_url] = min(times)
    return max(2, math.ceil(seconds / _forward_seconds[server.http_url]))


def test_requests_outliving_the_grace_are_answered_unavailable_and_the_process_exits_0(small_checkpoint, tmp_path):
    server = start(small_checkpoint, tmp_path / "server.log", "--shutdown-grace", str(GRACE))
    try:
        k = forwards_for(server, 4 * GRACE)  # each slow request: four graces of forwards
        k_quick = forwards_for(server, 0.8)  # first in the queue: done within the grace
        channel, client = stub(server)
        health = health_pb2_grpc.HealthStub(channel)
        with channel, ThreadPoolExecutor(3) as pool:
            quick = pool.submit(post, server, body("quick", slow_docs(k_quick, 1)))
            time.sleep(0.05)  # queued first
            slow_rest = pool.submit(post, server, body("slow rest", slow_docs(k, 100)))
            slow_grpc = client.Rerank.future(grpc_request("slow grpc", slow_docs(k, 300)), timeout=300)
            # more than one slow request's tokens queued: both are accepted
            poll(lambda: scrape(server)[QUEUED] > 2 * PAIR * k, what="both slow requests to queue")
            server.process.send_signal(signal.SIGTERM)
            assert not quick.done(), "the quick request finished before the signal: make it slower"
            signalled = time.monotonic()

            poll(lambda: requests.get(server.http_url + "/health", timeout=5).status_code == 503,
                 what="/health to answer 503 while draining")
            status = health.Check(health_pb2.HealthCheckRequest(service="rerank.v1.Rerank"), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            late = post(server, body("late", ["too late"]), timeout=30)
            assert late.status_code == 503 and "shutting down" in late.json()["message"], late.text

            assert quick.result().status_code == 200, quick.result().text  # finished within the grace
            cut = slow_rest.result()
            assert cut.status_code == 503, cut.text
            message = cut.json()["message"]
            assert "shutting down" in message and f"grace of {GRACE:g} s" in message, message
            assert cut.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
            try:
                slow_grpc.result()
                raise AssertionError("the slow gRPC call finished within the grace: make it slower")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details(), e
            answered = time.monotonic() - signalled
        assert server.process.wait(30) == 0, server.log()
        exited = time.monotonic() - signalled
        # the grace plus slack for a loaded machine, not the 8 graces of queued forwards
        assert answered < GRACE + 6, answered
        assert exited < GRACE + 12, exited
        log = server.log()
        assert re.search(r"drained: 1 of 3 accepted requests finished, 2 cut at the end of the grace", log), log
        assert "Traceback" not in log, log
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_a_second_signal_exits_at_once(small_checkpoint, tmp_path):
    server = start(small_checkpoint, tmp_path / "server.log", "--shutdown-grace", "120")
    try:
        k = forwards_for(server, 30)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post, server, body("slow", slow_docs(k, 500)))
            poll(lambda: scrape(server)[QUEUED] > 0, what="the slow request to queue")
            server.process.send_signal(signal.SIGINT)
            poll(lambda: requests.get(server.http_url + "/health", timeout=5).status_code == 503,
                 what="the drain to begin")
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(30)
            assert time.monotonic() - started < 15  # at once, with slack for a loaded machine: not the 30 s of work
            assert code == 128 + signal.SIGTERM, server.log()
            try:
                slow.result()
            except requests.ConnectionError:
                pass  # the caller of a process killed on purpose sees the connection end
        assert "SIGTERM again: exiting at once" in server.log(), server.log()
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
