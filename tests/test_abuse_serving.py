"""Abuse resistance against real servers on loopback (issue 25): the attacks the issue found,
each now refused or bounded while health checks on both transports keep answering.

Latency bounds here are the issue's targets with a margin for a loaded 2-core machine (the
figures are printed); the assertions that matter are that each probe was answered, and
answered SERVING, while the heavy request was being worked on."""
from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import WORDS, body, error_lines, grpc_request, poll, post, scrape, start_server

from rerank_server.schema import pb_grpc

pytestmark = pytest.mark.slow  # each test starts servers of its own

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBE_BOUND = 3.0  # seconds: the target is 1 s; the margin is for a loaded 2-core machine


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("abuse") / "server.log", "--api-key", KEY,
                          "--max-documents", "1000", "--http-idle-timeout", "2", "--http-body-timeout", "2")
    yield server
    assert server.stop() == 0, server.log()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


class Prober:
    """Probes REST /health, the gRPC health service and (with ``headers``) a small rerank request
    every 100 ms, on fresh connections, in a thread, until stopped; records each probe's latency
    and answer."""

    def __init__(self, server, headers: dict | None = None):
        self.server, self.headers, self.results, self._stop = server, headers, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                ok = requests.get(self.server.http_url + "/health", timeout=30).json()["status"] == "SERVING"
            except requests.RequestException as e:
                ok = repr(e)
            self.results.append(("rest", time.perf_counter() - started, ok))
            started = time.perf_counter()
            with grpc.insecure_channel(self.server.grpc_address) as channel:
                try:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
                    ok = status.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError as e:
                    ok = repr(e)
            self.results.append(("grpc", time.perf_counter() - started, ok))
            if self.headers is not None:
                started = time.perf_counter()
                try:
                    r = post(self.server, body("q", ["a small request"]), headers=self.headers, timeout=30)
                    ok = r.status_code == 200 or r.text
                except requests.RequestException as e:
                    ok = repr(e)
                self.results.append(("small", time.perf_counter() - started, ok))
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def check(self, during: str) -> None:
        kinds = ("rest", "grpc") + (("small",) if self.headers is not None else ())
        worst = {t: max(s for k, s, _ in self.results if k == t) for t in kinds}
        print(f"during {during}: {len(self.results)} probes, slowest health REST {worst['rest']:.3f} s, "
              f"gRPC {worst['grpc']:.3f} s" + (f", small rerank {worst['small']:.3f} s" if "small" in worst else ""))
        assert len(self.results) >= 4, "too few probes ran during the request"
        assert all(ok is True for _, _, ok in self.results), [r for r in self.results if r[2] is not True]
        assert max(worst.values()) < PROBE_BOUND, self.results


def test_the_issues_heaviest_requests_are_bounded_while_health_answers(server):
    """The issue's requests: 61M tokens from one 254 KB body; 400k rank_fields over 1,000
    objects; a 13 MiB document with 10,000 chunks; 3M empty documents. Each is refused with a
    4xx naming its limit, none stalls health on either transport, and a normal request
    afterwards is served."""
    rng = random.Random(0)
    attacks = {
        "61M tokens": (body(words(rng, 6000), [words(rng, 30000)], max_tokens_per_doc=8, max_chunks_per_doc=10000),
                       413, "--max-request-tokens"),
        "400k rank_fields": (body("q", [{}] * 1000, rank_fields=[f"f{i}" for i in range(400_000)]),
                             400, "rank_fields has 400000 names"),
        "13 MiB document": (body("q", [words(rng, 2_300_000)], max_chunks_per_doc=10000), 413,
                            "--max-request-tokens"),
        "3M empty documents": (body("q", [""] * 3_000_000), 400, "documents has 3000000 entries"),
    }
    for name, (payload, status, message) in attacks.items():
        data = json.dumps(payload).encode()
        before = rss_mb(server.process.pid)
        with Prober(server, AUTH) as prober:
            started = time.perf_counter()
            r = requests.post(server.http_url + "/v1/rerank", data=data, timeout=300,
                              headers={**AUTH, "Content-Type": "application/json"})
            elapsed = time.perf_counter() - started
            time.sleep(1.0)  # a few probes after the answer too
        grown = rss_mb(server.process.pid) - before
        print(f"{name}: {len(data) / 2**20:.1f} MiB -> {r.status_code} in {elapsed:.2f} s, RSS {grown:+.0f} MB")
        assert r.status_code == status and message in r.json()["message"], (name, r.text)
        prober.check(name)
    r = post(server, body("what is panda?", ["hi", "The giant panda is a bear."]), headers=AUTH)
    assert r.status_code == 200 and len(r.json()["results"]) == 2


@pytest.mark.parametrize("attack", ["61M tokens", "13 MiB document"])
def test_over_grpc_the_same_requests_are_resource_exhausted_while_health_answers(server, attack):
    rng = random.Random(1)
    if attack == "61M tokens":
        request = grpc_request(words(rng, 6000), [words(rng, 30000)], max_tokens_per_doc=8, max_chunks_per_doc=10000)
    else:
        request = grpc_request("q", [words(rng, 2_300_000)], max_chunks_per_doc=10000)
    channel = grpc.insecure_channel(server.grpc_address, options=[("grpc.max_send_message_length", 2**25)])
    with channel, Prober(server, AUTH) as prober:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.RerankStub(channel).Rerank(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=300)
        time.sleep(1.0)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-request-tokens" in e.value.details()
    prober.check(f"gRPC {attack}")


def test_grpc_refuses_without_the_key_before_reading_the_message(server):
    """30 unauthenticated 16 MiB calls: each UNAUTHENTICATED, and the server's memory does not
    grow by their size (it grew 3.3 GB when the key was checked after reading the message)."""
    request = grpc_request("q", ["x" * (16 * 2**20 - 4096)])
    before = rss_mb(server.process.pid)
    with grpc.insecure_channel(server.grpc_address, options=[("grpc.max_send_message_length", 2**25)]) as channel:
        rerank = pb_grpc.RerankStub(channel)

        def call(_):
            try:
                rerank.Rerank(request, metadata=[("authorization", "Bearer wrong")], timeout=60)
            except grpc.RpcError as e:
                return e.code()
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(call, range(30)))
    grown = rss_mb(server.process.pid) - before
    print(f"30 unauthenticated 16 MiB calls: RSS {grown:+.0f} MB")
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 30
    assert grown < 400  # 30 x 16 MiB read would be 480 MB at the least
    failures = scrape(server)
    assert failures['rerank_auth_failures_total{transport="grpc"}'] >= 30




def test_bad_headers_are_4xx_and_logged_in_one_line_without_the_key(server):
    secret = "Bearer dont-log-me-1234"
    nul = raw_http(server, b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: " + secret.encode()
                   + b"\x00\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert nul.split(b" ", 2)[1] == b"400", nul[:200]  # aiohttp's parser refuses it (as HTTP/1.0)
    latin = raw_http(server, b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xe9\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert latin.split(b" ", 2)[1] == b"401", latin[:300]
    forged = "2026-12-06 10:00:00,000 INFO rerank_server [-] POST /v1/rerank 200"
    r = requests.post(server.http_url + "/v1/rerank%0a" + forged.replace(" ", "%20"), json={}, headers=AUTH,
                      timeout=30)
    assert r.status_code == 404
    log = poll(lambda: server.log() if "malformed HTTP request" in server.log() else None, 30, "the warning")
    assert "dont-log-me" not in log
    assert not any(line.startswith(forged) for line in log.splitlines()), "a client wrote a log line of its own"
    assert "\\n" + forged in log  # it is there, escaped, inside the server's own line
    assert not error_lines(log) and "Traceback" not in log, log[-3000:]


def test_slow_and_idle_connections_are_cut_and_health_survives_many(tiny_checkpoint, tmp_path):
    """A server limited to 256 open files, 300 idle connections: health still answers on both
    transports; headers and bodies sent too slowly are cut; idle sockets are closed."""
    server = start_server(tiny_checkpoint, tmp_path / "fd.log", "--http-idle-timeout", "2",
                          "--http-body-timeout", "2", open_files=256)
    try:
        host, port = server.http_url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(300)]
        with Prober(server) as prober:
            time.sleep(1.5)
        prober.check("300 idle connections under a 256-file limit")

        # every idle socket ends (a read past 30 s raises): evicted for a newer one, or closed
        # after the 2 s idle timeout; none was answered anything but EOF or the cap's 503
        for s in idle:
            s.settimeout(30)
            answer = b"".join(iter(lambda s=s: s.recv(65536), b""))
            assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer[:200]
            s.close()

        started = time.perf_counter()
        slow_headers = raw_http(server, b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\n")
        header_cut = time.perf_counter() - started
        started = time.perf_counter()
        slow_body = raw_http(server, b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                          b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        body_cut = time.perf_counter() - started
        print(f"slow headers cut after {header_cut:.1f} s, slow body answered after {body_cut:.1f} s")
        assert slow_headers == b"" and header_cut < 30
        assert slow_body.startswith(b"HTTP/1.1 408") and b"--http-body-timeout" in slow_body and body_cut < 30
        metrics = scrape(server)
        assert metrics['rerank_malformed_http_requests_total{reason="evicted_idle"}'] > 0
        assert not error_lines(server.log()), server.log()[-3000:]
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def raw_http(server, head: bytes) -> bytes:
    """Sends ``head`` and then nothing more, keeping the connection open; -> what the server
    answered before it closed the connection (it must close it: the read times out otherwise)."""
    host, port = server.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_dead_scheduler_turns_health_off_and_exits_non_zero(tiny_checkpoint, tmp_path):
    """A bug in the scheduler (injected through sitecustomize: the batcher raises once it has
    work): the request in flight fails with 500, health is no longer SERVING, the process exits 1."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "from rerank_server import scheduler\n"
        "take = scheduler.Scheduler._take_batch\n"
        "def broken(self):\n"
        "    if self._jobs:\n"
        "        raise KeyError('injected bug in the batcher')\n"
        "    return take(self)\n"
        "scheduler.Scheduler._take_batch = broken\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))}
    server = start_server(tiny_checkpoint, tmp_path / "dead.log", env=env)
    try:
        r = post(server, body("q", ["a", "b"]), timeout=60)
        assert r.status_code == 500 and "scheduler failed" in r.json()["message"], r.text
        try:
            assert requests.get(server.http_url + "/health", timeout=10).status_code == 503
        except requests.ConnectionError:  # already gone
            pass
        code = server.process.wait(60)
        assert code == 1, server.log()
        assert "CRITICAL" in server.log() and "injected bug in the batcher" in server.log()
    finally:
        if server.process.poll() is None:
            server.process.kill()
