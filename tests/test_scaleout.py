"""Scale-out: what a fleet needs from each replica (a connection age, the scaling signal) and the
proof with real processes (marked slow): three rerank-servers on 127.0.0.1-3 behind the client's
own balancing, one drained by SIGTERM, one killed by SIGKILL, a fourth added, and REST behind
nginx with a kill. Each run prints calls per replica and the client's errors."""
from __future__ import annotations

import asyncio
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from helpers import SERVED_MODEL, LiveServer, free_port, poll, scrape, sentence, start_server
from test_scheduler import RecordingForward, run, with_scheduler

from rerank_client import RerankClient, RerankError, build_request
from rerank_client.http import post_rerank
from rerank_server.config import parse_args
from rerank_server.grpc_server import connection_options


def test_pending_tokens_count_waiting_and_running_work():
    """The scaling signal: rerank_queued_tokens misses the batch on the device; pending has both."""
    forward = RecordingForward()

    async def body(s):
        forward.gate.clear()  # the first batch stays on the "device"
        first = asyncio.create_task(s.score([[1] * 6]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(s.score([[2] * 4, [3] * 5]))
        await asyncio.sleep(0.05)
        while_held = (s.queued_tokens, s.pending_tokens)
        forward.gate.set()
        await first, await second
        return while_held, (s.queued_tokens, s.pending_tokens)
    while_held, after = run(with_scheduler(forward, body))
    assert while_held == (9, 6 + 9) and after == (0, 0)


def test_connection_age_flags(capsys):
    config = parse_args(["--max-connection-age", "2.5", "--max-connection-age-grace", "1"])
    options = dict(connection_options(config.max_connection_age, config.max_connection_age_grace))
    assert options["grpc.max_connection_age_ms"] == 2500 and options["grpc.max_connection_age_grace_ms"] == 1000
    assert "grpc.max_connection_age_ms" not in dict(connection_options(0, 30))  # 0: no limit
    assert parse_args([]).max_connection_age == 120
    with pytest.raises(SystemExit) as e:
        parse_args(["--max-connection-age", "-1"])
    assert e.value.code == 2 and "--max-connection-age must be >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------- real processes

ADDRESSES = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]  # one loopback address per replica
CONNECTION_AGE = 3.0  # --max-connection-age of the test's replicas (production: 120 s)
NAME = "replicas.rerank.test"  # what the test's DNS server answers with the replicas' addresses


class Dns:
    """A DNS server on 127.0.0.1 (UDP) answering A queries for NAME with ``addresses``, as
    Kubernetes' DNS does for a headless Service (ready pods only), and nothing else. The client
    reaches it through the target ``dns://127.0.0.1:<port>/NAME:<port>``."""

    def __init__(self, addresses: list[str]):
        self.addresses = list(addresses)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True, name="dns").start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(2048)
            except OSError:  # closed
                return
            qid = struct.unpack(">H", query[:2])[0]
            i, labels = 12, []
            while query[i]:
                labels.append(query[i + 1:i + 1 + query[i]].decode())
                i += 1 + query[i]
            qtype = struct.unpack(">H", query[i + 1:i + 3])[0]
            known = ".".join(labels).lower() == NAME
            answers = [struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(a)  # A, IN, TTL 0
                       for a in (self.addresses if known and qtype == 1 else ())]
            header = struct.pack(">HHHHHH", qid, 0x8180 | (0 if known else 3), 1, len(answers), 0, 0)
            self.sock.sendto(header + query[12:i + 5] + b"".join(answers), peer)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Replica:
    name: str  # its first --served-model-name: every response's `model` says which replica answered
    address: str
    server: LiveServer

    @property
    def alive(self) -> bool:
        return self.server.process.poll() is None

    def log_count(self, text: str) -> int:
        return self.server.log().count(text)


@dataclass
class Fleet:
    checkpoint: Path
    logs: Path
    http_port: int
    grpc_port: int
    dns: Dns
    replicas: list[Replica] = field(default_factory=list)

    def start(self, address: str) -> Replica:
        name = f"replica-{address.rsplit('.', 1)[1]}"
        flags = ["--model", str(self.checkpoint), "--served-model-name", name, SERVED_MODEL, "--host", address,
                 "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                 "--max-connection-age", str(CONNECTION_AGE), "--max-connection-age-grace", "5",
                 "--shutdown-grace", "10"]
        server = start_server(None, self.logs / f"{name}.log", *flags, wait=False, flags=False,
                              env={"OMP_NUM_THREADS": "1"})
        server.http_url, server.grpc_address = f"http://{address}:{self.http_port}", f"{address}:{self.grpc_port}"
        replica = Replica(name, address, server)
        self.replicas.append(replica)
        return replica

    @staticmethod
    def wait_ready(*replicas: Replica) -> None:
        def ready(r: Replica) -> bool:
            if not r.alive:
                raise RuntimeError(f"{r.name} exited with {r.server.process.returncode}:\n{r.server.log()}")
            try:
                return requests.get(r.server.http_url + "/health", timeout=5).status_code == 200
            except requests.RequestException:
                return False
        for r in replicas:
            poll(lambda r=r: ready(r), timeout=180, what=f"{r.name} to serve", interval=0.2)

    def target(self) -> str:
        return f"dns://127.0.0.1:{self.dns.port}/{NAME}:{self.grpc_port}"

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]


def ports_free_on_every_address() -> tuple[int, int]:
    for _ in range(50):
        ports = free_port(), free_port()
        if ports[0] == ports[1]:
            continue
        try:
            for address in ADDRESSES:
                for port in ports:
                    with socket.socket() as s:
                        s.bind((address, port))
            return ports
        except OSError:
            continue
    raise RuntimeError("no pair of ports free on all of " + ", ".join(ADDRESSES))


@pytest.fixture(scope="module")
def fleet(tiny_checkpoint, tmp_path_factory):
    """Three replicas on 127.0.0.1-3 (same ports), started in parallel, behind the test's DNS."""
    http_port, grpc_port = ports_free_on_every_address()
    fleet = Fleet(tiny_checkpoint, tmp_path_factory.mktemp("fleet"), http_port, grpc_port, Dns(ADDRESSES[:3]))
    try:
        started = [fleet.start(a) for a in ADDRESSES[:3]]
        fleet.wait_ready(*started)
        yield fleet
    finally:
        for r in fleet.live():
            r.server.process.send_signal(signal.SIGTERM)
        for r in fleet.replicas:
            try:
                r.server.process.wait(30)
            except subprocess.TimeoutExpired:
                r.server.process.kill()
        fleet.dns.close()


# The requests: a few distinct ones, each with its scores as every replica gives them.

@dataclass
class Variant:
    query: str
    documents: list[str]
    scores: dict[int, float] = field(default_factory=dict)  # index -> relevance_score


def variants(fleet: Fleet, count: int = 6) -> list[Variant]:
    rng = random.Random(23)
    made = [Variant(sentence(rng, 6), [sentence(rng, rng.randint(4, 40)) for _ in range(8)]) for _ in range(count)]
    for v in made:
        per_replica = []
        for r in fleet.live():
            with RerankClient(r.server.grpc_address, timeout=60, load_balancing="pick_first") as c:
                per_replica.append({x.index: x.relevance_score for x in c.rerank(v.query, v.documents).results})
        v.scores = per_replica[0]
        for other in per_replica[1:]:  # the same checkpoint everywhere: the same scores
            assert other == pytest.approx(v.scores, abs=1e-5)
    return made


@dataclass
class Call:
    started: float
    ended: float
    replica: str | None  # who answered
    response_id: str | None
    error: str | None


class Load:
    """``callers`` threads, each making calls back to back through ``call`` (one shared client)
    until stopped: bounded load. Every outcome is recorded; a response with other scores than
    the variant's counts as an error."""

    def __init__(self, call, variants: list[Variant], callers: int = 4):
        self.call, self.variants, self.callers = call, variants, callers
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(self.callers)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(120)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stopping.is_set():
            v = rng.choice(self.variants)
            started = time.monotonic()
            try:
                model, response_id, scores = self.call(v)
                error = None if scores == pytest.approx(v.scores, abs=1e-5) else f"wrong scores from {model}"
            except RerankError as e:
                model, response_id, error = None, None, f"{e.code.name}: {e.message}"
            with self.lock:
                self.calls.append(Call(started, time.monotonic(), model, response_id, error))

    def wait_calls(self, more: int, since: int | None = None) -> None:
        base = len(self.calls) if since is None else since
        poll(lambda: len(self.calls) >= base + more, timeout=120, what=f"{more} more calls", interval=0.01)

    def errors(self) -> list[str]:
        return [c.error for c in self.calls if c.error]


def grpc_call(client: RerankClient):
    def call(v: Variant):
        r = client.rerank(v.query, v.documents, model=SERVED_MODEL)
        return r.model, r.id, {x.index: x.relevance_score for x in r.results}
    return call


def ok_grpc_calls(replica: Replica) -> float:
    return scrape(replica.server).get(
        'rerank_requests_total{code="OK",http_status="",route="Rerank",transport="grpc"}', 0.0)


def scrape_signal(replica: Replica) -> tuple[float, float]:
    metrics = scrape(replica.server)
    return metrics["rerank_pending_tokens"], metrics["rerank_requests_in_flight"]


def report(title: str, calls: list[Call]) -> None:
    per_replica = Counter(c.replica for c in calls if c.replica)
    latencies = sorted(c.ended - c.started for c in calls)
    print(f"\n{title}: {len(calls)} calls, per replica {dict(sorted(per_replica.items()))}, "
          f"errors {sum(1 for c in calls if c.error)}; latency median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms")


@pytest.mark.slow
@pytest.mark.serving
def test_grpc_fleet_spreads_drains_survives_a_kill_and_grows(fleet):
    """Through one RerankClient on the DNS name (the defaults: round_robin, health-checked,
    retries on UNAVAILABLE): spread over three, one drained by SIGTERM, one SIGKILLed mid-load,
    a fourth added and reached within the connection age. Zero client errors throughout."""
    assert len(fleet.live()) == 3
    reference = variants(fleet)
    r1, r2, r3 = fleet.live()
    before = {r.name: ok_grpc_calls(r) for r in (r1, r2, r3)}
    # re-resolve at most every 0.5 s (gRPC's default: 30 s, well under production's 120 s connection age)
    options = [("grpc.dns_min_time_between_resolutions_ms", 500)]
    with RerankClient(fleet.target(), timeout=60, options=options) as client:
        # 1. spread: each replica's own /metrics counts what the client saw it answer
        with Load(grpc_call(client), reference) as load:
            load.wait_calls(60)
            # the scaling signal, as scraped: work in flight on some replica while the load runs ...
            signal_seen = poll(lambda: [m for m in map(scrape_signal, (r1, r2, r3)) if min(m) > 0],
                               timeout=60, what="a scrape that sees pending tokens and a request in flight")
        spread = list(load.calls)
        print(f"\nbusy replica's (pending tokens, requests in flight): {signal_seen[0]}")
        assert [scrape_signal(r) for r in (r1, r2, r3)] == [(0, 0)] * 3  # ... and none once it stopped
        report("spread over three", spread)
        seen = Counter(c.replica for c in spread)
        for r in (r1, r2, r3):
            assert ok_grpc_calls(r) - before[r.name] == seen[r.name], r.name
            assert seen[r.name] >= len(spread) // 6, f"{r.name} got {seen[r.name]} of {len(spread)}: {seen}"

        # 2. drain: SIGTERM (health NOT_SERVING; DNS drops it as Kubernetes does a terminating pod)
        with Load(grpc_call(client), reference) as load:
            load.wait_calls(20)
            term = time.monotonic()
            r2.server.process.send_signal(signal.SIGTERM)
            fleet.dns.addresses.remove(r2.address)
            assert r2.server.process.wait(60) == 0, r2.server.log()
            exited = time.monotonic()
            load.wait_calls(40)
        drain = list(load.calls)
        report("r2 drained", drain)
        refused = r2.log_count("gRPC Rerank UNAVAILABLE")
        print(f"  {r2.name}: exited 0 {exited - term:.2f} s after SIGTERM; answered "
              f"{sum(1 for c in drain if c.replica == r2.name and c.ended > term)} calls after it, refused {refused} "
              "while draining (retried by the client on another replica)")
        assert "0 cut at the end of the grace" in r2.server.log()
        after = [c for c in drain if c.started > exited]
        assert after and {c.replica for c in after} == {r1.name, r3.name}

        # 3. kill: SIGKILL mid-load; the calls it held fail UNAVAILABLE and gRPC retries them elsewhere
        with Load(grpc_call(client), reference) as load:
            load.wait_calls(20)
            kill = time.monotonic()
            r3.server.process.send_signal(signal.SIGKILL)
            fleet.dns.addresses.remove(r3.address)
            r3.server.process.wait(10)
            load.wait_calls(40)
        killed = list(load.calls)
        report("r3 killed", killed)
        spanning = [c for c in killed if c.started <= kill <= c.ended]
        print(f"  {len(spanning)} calls were in flight at the kill; their latencies: "
              f"{sorted(round((c.ended - c.started) * 1000) for c in spanning)} ms")
        assert {c.replica for c in killed if c.started > kill} == {r1.name}

        # 4. grow: a fourth replica, added to DNS once it serves, gets calls after at most about
        # one connection age (a GOAWAY makes the client re-resolve; nothing else does here)
        r4 = fleet.start(ADDRESSES[3])
        with Load(grpc_call(client), reference) as load:
            fleet.wait_ready(r4)
            fleet.dns.addresses.append(r4.address)
            added = time.monotonic()
            poll(lambda: any(c.replica == r4.name for c in load.calls), timeout=10 * CONNECTION_AGE,
                 what=f"{r4.name} to get calls (connection age {CONNECTION_AGE:g} s)", interval=0.05)
            reached = min(c.ended for c in load.calls if c.replica == r4.name)
            load.wait_calls(40)
        grown = list(load.calls)
        report("r4 added", grown)
        report("  of which after its first answer", [c for c in grown if c.started > reached])
        print(f"  {r4.name}: first answer {reached - added:.1f} s after it joined DNS "
              f"(connection age {CONNECTION_AGE:g} s +-10%)")
        assert Counter(c.replica for c in grown if c.started > reached)[r4.name] > 0

    everything = spread + drain + killed + grown
    report("all phases", everything)
    assert not [c.error for c in everything if c.error], Counter(c.error for c in everything if c.error)
    ids = [c.response_id for c in everything]
    assert len(set(ids)) == len(ids)  # every call answered once, by one replica


# ---------------------------------------------------------------- REST behind nginx

def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)


NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream rerank {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://rerank;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # A refused or reset connection, a timeout or a 503 (loading, draining) goes to the next
            # replica; non_idempotent: also for POST once sent, since reranking is idempotent.
            proxy_next_upstream error timeout http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


@pytest.mark.slow
@pytest.mark.serving
def test_rest_behind_nginx_survives_a_kill(fleet, tmp_path):
    nginx = nginx_binary()
    if not nginx:
        pytest.skip("nginx is not installed (.ci/run installs the OS package where it can: apt-get install nginx)")
    live = fleet.live()
    assert len(live) >= 2, "needs two replicas up"
    reference = variants(fleet)
    port = free_port()
    servers = "\n".join(f"        server {r.address}:{fleet.http_port} max_fails=1 fail_timeout=10s;" for r in live)
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp_path, servers=servers, port=port))
    proxy = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def call(v: Variant):
        # max_retries=0: the failover measured here is nginx's own, not the client's
        body = post_rerank(url, build_request(v.query, v.documents, model=SERVED_MODEL), timeout=60, max_retries=0)
        return body["model"], body["id"], {r["index"]: r["relevance_score"] for r in body["results"]}
    try:
        def up() -> bool:
            if proxy.poll() is not None:
                raise RuntimeError(f"nginx exited with {proxy.returncode}: {proxy.stdout.read()}")
            try:
                return requests.get(url + "/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        poll(up, timeout=30, what="nginx to proxy /health")
        victim = live[-1]
        with Load(call, reference) as load:
            load.wait_calls(30)
            kill = time.monotonic()
            victim.server.process.send_signal(signal.SIGKILL)
            victim.server.process.wait(10)
            load.wait_calls(40)
        calls = list(load.calls)
        report(f"REST through nginx, {victim.name} killed", calls)
        spanning = [c for c in calls if c.started <= kill <= c.ended]
        print(f"  {len(spanning)} calls were in flight at the kill; their latencies: "
              f"{sorted(round((c.ended - c.started) * 1000) for c in spanning)} ms")
        assert {c.replica for c in calls if c.ended < kill} == {r.name for r in live}  # balanced before
        assert victim.name not in {c.replica for c in calls if c.started > kill}
        assert not load.errors(), Counter(load.errors())
        ids = [c.response_id for c in calls]
        assert len(set(ids)) == len(ids)
    finally:
        proxy.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
