"""End-to-end load benchmark: the live server under 1, 8 and 64 concurrent clients.

    python -m benchmarks.load                         # small random checkpoint (6 x 384), ~15 min on 2 cores
    python -m benchmarks.load --size tiny             # 2 x 64: a stress test of the host path
    python -m benchmarks.load --quick                 # a minute: a smoke test of this script
    python -m benchmarks.load --device cuda --checkpoint checkpoints/full-random-fp16

Which model: the figures are about the server's overhead, so the forward must cost what a
real one costs next to tokenizing and transcoding. On a CPU that is the ``small`` random
checkpoint (the shapes of the smallest production cross-encoders, MiniLM-L6): its forward
costs ~200x the tokenizer per token, as bge-reranker-v2-m3 does on a GPU host. The
``tiny`` one forwards about as fast as the same two cores tokenize, so there it measures
how the tokenizer and the forward share the cores; the full-size model answers one request
in ~10 s on a CPU. On a GPU use the full-size checkpoint.

Loopback only, bounded: each closed-loop run sends a fixed number of requests, sized from
the raw forward's rate to last about ``--duration`` seconds (at least two per client), and
is timed from the first send to the last answer; the script stops its servers itself.

The workload: seeded seed-like requests, a query and 20-100 sentence-length documents
(1-3 sentences of 6-30 common English words), tokenized by the checkpoint's real
tokenizer to count their tokens beforehand (the count the server reports in
``usage.prompt_tokens``: every pair, special tokens included).

What it measures, in one run:

1. *serving*: closed-loop clients (each sends its next request as soon as the last one is
   answered, until the run's count is sent) over REST (aiohttp, JSON bodies encoded
   beforehand) and gRPC (``grpc.aio``, messages serialized beforehand), at each
   concurrency: requests/s, real (unpadded) tokens/s, latency p50/p95/p99, and from the
   server's ``/metrics`` the mean pairs and tokens per forward;
2. *raw forward*: ``Engine.forward`` in this process on the same pairs, cut into batches of
   ``--max-batch-tokens`` as the scheduler would, with the server idle: at the start, at the
   end, and right before and after each run at the highest concurrency, whose serving
   tokens/s is reported as a fraction of the mean of those two (target: >= 0.90 at 64
   clients);
3. *batching off*: the same clients against a server started with ``--no-batching`` (one
   request per forward);
4. *latency at half load*: open-loop arrivals at half the saturating request rate (the
   best closed-loop rate of that transport), twice: *paced* (evenly spaced, as wrk2 or k6's
   constant-arrival-rate send them) and *Poisson* (independent callers, as production
   sees them); target p99 <= 3 x p50. Beside each, the same arrivals through an *ideal FIFO
   server* (a simulation: no overhead at all, batches of ``--max-batch-tokens`` at the raw
   forward's rate): what queueing alone costs, so the server's own share of the tail can
   be told apart. Paced at half load an ideal server hardly queues (a request would have
   to take twice the mean), so there the tail is nearly all the server's own; Poisson
   bursts queue even in the ideal server (its p99/p50 is ~3.4-3.9 here), and for jobs of
   bounded size no order of service gives a lighter waiting-time tail than FIFO
   (asymptotically: Stolyar & Ramanan, 2001).

The client runs on the same machine as the server and competes with it for the CPUs;
every run records the CPU time of the server and of this client, and of the rest of the
machine (``foreign_cpus``, from ``/proc/stat``), so a contended run can be told apart.

Results go to ``benchmarks/results/load-<checkpoint>-<device>-<YYYY-MM-DD>.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.checkpoints import ensure_checkpoint
from benchmarks.measure import MachineLoad, device_description, git_commit, slug

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
MODEL_NAME = "BAAI/bge-reranker-v2-m3"
RERANK_METHOD = "/rerank.v1.Rerank/Rerank"

TARGET_FRACTION_OF_RAW = 0.90  # serving tokens/s / raw forward tokens/s, at the highest concurrency
TARGET_P99_OVER_P50 = 3.0  # at half the saturating load

WORDS = ("the a of to and in is was for on with as by at from that which this it be are were has have had "
         "not but or an they we you he she their our its more most other some such only also than then "
         "time year people way day man world life hand part child eye woman place work week case point "
         "government company number group problem fact water energy market city river music language "
         "history science school health research network computer study report court policy price growth "
         "climate species protein cell light sound design garden kitchen train bridge mountain island "
         "ancient modern early later public private local national global digital natural human economic "
         "quickly often rarely never always slowly carefully recently finally mostly increase reduce "
         "support develop measure describe produce protect explain improve consider include provide").split()


# --------------------------------------------------------------------------- workload

def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice(".....?!")


@dataclass
class Workload:
    queries: list[str]
    documents: list[list[str]]
    pairs: list[list[list[int]]]  # per request, per document: the token ids the model sees
    tokens: list[int] = field(default_factory=list)  # per request

    def __post_init__(self):
        self.tokens = [sum(len(p) for p in pairs) for pairs in self.pairs]

    def __len__(self) -> int:
        return len(self.queries)


def make_workload(checkpoint: Path, n_requests: int, seed: int, max_length: int | None) -> Workload:
    from rerank_server.engine import Engine

    tokenizer = Engine.load_tokenizer(checkpoint, max_length)  # the checkpoint's template and limit
    rng = random.Random(seed)
    queries, documents, pairs = [], [], []
    for _ in range(n_requests):
        query = sentence(rng, rng.randint(4, 14))
        docs = [" ".join(sentence(rng, rng.randint(6, 30)) for _ in range(rng.randint(1, 3)))
                for _ in range(rng.randint(20, 100))]
        queries.append(query)
        documents.append(docs)
        pairs.append(tokenizer.encode_pairs(query, docs))
    return Workload(queries, documents, pairs)


# --------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``rerank-server`` on free loopback ports, stopped with SIGTERM."""

    def __init__(self, checkpoint: Path, log_path: Path, *flags: str, threads: int | None = None):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        self.flags = flags
        args = [sys.executable, "-m", "rerank_server", "--model", str(checkpoint), "--served-model-name", MODEL_NAME,
                "--host", "127.0.0.1", "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--log-level", "WARNING", *flags]
        self.log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.process = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.process.pid)

    async def wait_ready(self, session, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                async with session.get(self.url + "/health") as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout:.0f} s:\n{self.log_path.read_text()}")

    async def idle(self, session, timeout: float = 120) -> None:
        """Waits until nothing is queued (the cancelled requests of a run are dropped)."""
        deadline = time.monotonic() + timeout
        while (await self.metrics(session)).get("rerank_queued_tokens", 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def metrics(self, session) -> dict[str, float]:
        async with session.get(self.url + "/metrics") as r:
            text = await r.text()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


# --------------------------------------------------------------------------- clients

class Transport:
    """Sends request ``i`` of the workload, pre-encoded; -> True on success."""

    def __init__(self, kind: str, server: Server, workload: Workload, session):
        from google.protobuf import struct_pb2

        from rerank_server.schema import pb

        self.kind = kind
        if kind == "rest":
            self.session = session
            self.url = server.url + "/v1/rerank"
            self.bodies = [json.dumps({"model": MODEL_NAME, "query": q, "documents": d}).encode()
                           for q, d in zip(workload.queries, workload.documents, strict=True)]
        else:
            import grpc

            self.channel = grpc.aio.insecure_channel(server.grpc_address)
            self.call = self.channel.unary_unary(RERANK_METHOD)  # bytes in, bytes out
            self.bodies = [pb.RerankRequest(model=MODEL_NAME, query=q, documents=[
                struct_pb2.Value(string_value=x) for x in d]).SerializeToString()
                for q, d in zip(workload.queries, workload.documents, strict=True)]

    async def send(self, i: int) -> bool:
        body = self.bodies[i % len(self.bodies)]
        if self.kind == "rest":
            async with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status == 200
        import grpc
        try:
            await self.call(body, timeout=300)
            return True
        except grpc.aio.AioRpcError:
            return False

    async def close(self) -> None:
        if self.kind == "grpc":
            await self.channel.close()


def machine_busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Recorder:
    """Completions within the timed window, and the CPU time spent during it."""

    def __init__(self, server: Server, workload: Workload):
        self.server, self.workload = server, workload
        self.latencies: list[float] = []
        self.sent: list[tuple[float, int]] = []  # open loop: (seconds from the start, request index)
        self.tokens = 0
        self.errors = 0

    def done(self, i: int, ok: bool, latency: float) -> None:
        if ok:
            self.latencies.append(latency)
            self.tokens += self.workload.tokens[i % len(self.workload)]
        else:
            self.errors += 1

    def __enter__(self) -> Recorder:
        self.t0, self.m0 = time.perf_counter(), machine_busy_s()
        self.server_cpu0, self.client0 = self.server.cpu_seconds(), os.times()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        m1, c1 = machine_busy_s(), os.times()
        self.server_cpus = (self.server.cpu_seconds() - self.server_cpu0) / self.wall
        self.client_cpus = (c1.user + c1.system - self.client0.user - self.client0.system) / self.wall
        self.foreign_cpus = (None if m1 is None or self.m0 is None else
                             max(0.0, (m1 - self.m0) / self.wall - self.server_cpus - self.client_cpus))

    def summary(self, **extra) -> dict:
        n = len(self.latencies)
        return {**extra, "seconds": round(self.wall, 3), "requests": n, "errors": self.errors,
                "requests_per_s": n / self.wall, "tokens_per_s": self.tokens / self.wall,
                "latency_s": {"p50": percentile(self.latencies, 0.50), "p95": percentile(self.latencies, 0.95),
                              "p99": percentile(self.latencies, 0.99),
                              "mean": statistics.fmean(self.latencies) if n else None,
                              "max": max(self.latencies) if n else None},
                "cpus": {"server": self.server_cpus, "client": self.client_cpus, "foreign": self.foreign_cpus}}


async def closed_loop(transport: Transport, recorder: Recorder, concurrency: int, requests: int) -> None:
    """``concurrency`` clients send ``requests`` requests in all, each the next as soon as its
    last is answered. A fixed amount of work, not a time window: a window would cut off the
    requests in flight at its end, a large share of the work when requests are long."""
    counter = iter(range(requests))

    async def client() -> None:
        for i in counter:
            t0 = time.perf_counter()
            ok = await transport.send(i)
            recorder.done(i, ok, time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(concurrency)))


ARRIVALS = ("paced", "Poisson")


def arrival_gaps(arrivals: str, rate: float, seed: int):
    """Seconds between consecutive sends: evenly spaced, or exponential (a Poisson process)."""
    if arrivals == "paced":
        while True:
            yield 1 / rate
    rng = random.Random(seed)
    while True:
        yield rng.expovariate(rate)


async def open_loop(transport: Transport, recorder: Recorder, rate: float, requests: int, arrivals: str,
                    seed: int, drain_s: float = 120) -> int:
    """``requests`` sends at ``rate``/s on average, ``arrivals`` "paced" or "Poisson", each
    on time whether or not earlier ones were answered; waits (bounded) for the last answers.
    -> requests sent."""
    gaps = arrival_gaps(arrivals, rate, seed)
    start = time.perf_counter()
    tasks, i, next_at = [], 0, 0.0

    async def one(k: int) -> None:
        t0 = time.perf_counter()
        recorder.sent.append((t0 - start, k))
        ok = await transport.send(k)
        recorder.done(k, ok, time.perf_counter() - t0)

    while i < requests:
        delay = start + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        next_at += next(gaps)
    done, pending = await asyncio.wait(tasks, timeout=drain_s)
    for t in pending:
        t.cancel()
    recorder.errors += len(pending)
    return i


def ideal_fifo_latencies(sent: list[tuple[float, int]], workload: Workload, tokens_per_s: float,
                         max_batch_tokens: int) -> list[float]:
    """The latencies an ideal FIFO server would give the same arrivals: no tokenizing, no
    transport, no gaps; one batch at a time of up to ``max_batch_tokens`` tokens taken in
    arrival order by pairs, as our scheduler does, each lasting its tokens / ``tokens_per_s``."""
    arrivals = sorted(sent)
    queue: deque[list] = deque()  # [arrival, remaining pair lengths]
    latencies, now, i = [], 0.0, 0
    while i < len(arrivals) or queue:
        if not queue and now < arrivals[i][0]:
            now = arrivals[i][0]
        while i < len(arrivals) and arrivals[i][0] <= now:
            t, k = arrivals[i]
            queue.append([t, deque(len(p) for p in workload.pairs[k % len(workload)])])
            i += 1
        budget, finished = max_batch_tokens, []
        while queue and (budget == max_batch_tokens or (queue[0][1] and queue[0][1][0] <= budget)):
            arrived, pairs = queue[0]
            while pairs and (budget == max_batch_tokens or pairs[0] <= budget):
                budget -= pairs.popleft()
            if pairs:
                break
            finished.append(arrived)
            queue.popleft()
        now += (max_batch_tokens - budget) / tokens_per_s
        latencies += [now - arrived for arrived in finished]
    return latencies


# --------------------------------------------------------------------------- raw forward

class RawForward:
    """Engine.forward in this process on the workload's pairs, in arrival order, cut into
    batches of at most ``max_batch_tokens`` tokens, as the scheduler would; the model is
    loaded once. ``measure`` times passes over the batches (all of them, or the first ones
    that take about ``duration / passes``; at least ``passes``, more while under
    ``duration``); the best pass is the machine's rate (the others are slowed by whatever
    else runs on it), the median is kept. It is measured again right before and after each
    run at the highest concurrency: a shared machine's speed drifts by 10-20% over minutes,
    so serving is compared with the raw rate of its neighbours in time."""

    def __init__(self, checkpoint: Path, workload: Workload, device: str, max_length: int | None,
                 max_batch_tokens: int, duration: float, attention: str | None, passes: int = 3):
        import torch

        from rerank_server.engine import Engine

        self.engine = engine = Engine.load(str(checkpoint), device, max_length, attention)
        engine.warm_up()
        batches, batch, budget = [], [], max_batch_tokens
        for pairs in workload.pairs:
            for p in pairs:
                if batch and len(p) > budget:
                    batches.append(batch)
                    batch, budget = [], max_batch_tokens
                batch.append(p)
                budget -= len(p)
        if batch:
            batches.append(batch)
        self.sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        engine.forward(batches[0])  # this shape once more, outside the timing; and how long a batch takes
        self.sync()
        # a pass over as many batches as take about duration / passes (all of them for a fast model)
        self.batches = batches[:max(4, math.ceil(duration / passes / (time.perf_counter() - t0)))]
        self.tokens = sum(len(p) for b in self.batches for p in b)
        self.duration, self.passes = duration, passes

    def measure(self) -> dict:
        import torch

        rates, foreign = [], []
        start = time.perf_counter()
        while len(rates) < self.passes or time.perf_counter() - start < self.duration:
            m0, c0, t0 = machine_busy_s(), os.times(), time.perf_counter()
            for b in self.batches:
                self.engine.forward(b)
            self.sync()
            wall = time.perf_counter() - t0
            c1, m1 = os.times(), machine_busy_s()
            own = (c1.user + c1.system - c0.user - c0.system) / wall
            rates.append(self.tokens / wall)
            foreign.append(None if m0 is None or m1 is None else max(0.0, (m1 - m0) / wall - own))
            if len(rates) >= 20:
                break
        best = max(range(len(rates)), key=rates.__getitem__)
        model = self.engine.model
        return {"tokens_per_s": rates[best], "median_tokens_per_s": statistics.median(rates), "passes": len(rates),
                "tokens_per_pass": self.tokens, "forwards_per_pass": len(self.batches),
                "mean_tokens_per_forward": self.tokens / len(self.batches), "threads": torch.get_num_threads(),
                "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
                "attention_backend": model.ops.attention_backend,
                "foreign_cpus_best_pass": foreign[best],
                "foreign_cpus_max": max((f for f in foreign if f is not None), default=None)}


# --------------------------------------------------------------------------- the run

def print_raw(raw: dict) -> None:
    foreign = raw["foreign_cpus_best_pass"]
    print(f"  {raw['tokens_per_s']:9.0f} tok/s best of {raw['passes']} passes "
          f"(median {raw['median_tokens_per_s']:.0f}; {raw['forwards_per_pass']} forwards "
          f"of {raw['mean_tokens_per_forward']:.0f} tokens a pass), {raw['device']} "
          f"{raw['dtype']}, attention {raw['attention_backend']}, {raw['threads']} threads"
          f"{'' if foreign is None else f', foreign {foreign:.2f} CPUs'}", flush=True)


def fmt_latency(lat: dict) -> str:
    if lat["p50"] is None:
        return "no answers"
    return f"p50 {lat['p50'] * 1000:7.1f}  p95 {lat['p95'] * 1000:7.1f}  p99 {lat['p99'] * 1000:7.1f} ms"


def print_run(r: dict) -> None:
    batch = r.get("server_batches", {})
    per_forward = (f"  {batch['pairs_per_forward']:5.1f} pairs, {batch['tokens_per_forward']:6.0f} tokens/forward"
                   if batch.get("forwards") else "")
    foreign = r["cpus"]["foreign"]
    print(f"  {r['transport']:4s} {'batching' if r['batching'] else 'no-batch'} {r['mode']:>10s} "
          f"{r['requests_per_s']:7.1f} req/s {r['tokens_per_s']:9.0f} tok/s  {fmt_latency(r['latency_s'])}"
          f"  ({r['requests']} ok, {r['errors']} errors){per_forward}"
          f"{'' if foreign is None else f'  foreign {foreign:.2f} CPUs'}", flush=True)


def closed_loop_requests(args, concurrency: int, raw_tokens_per_s: float, workload: Workload) -> int:
    """Requests in a closed-loop run: about ``--duration`` seconds at the raw forward's rate,
    at least two per client."""
    per_request = statistics.fmean(workload.tokens)
    return max(2 * concurrency, math.ceil(args.duration * raw_tokens_per_s / per_request))


async def serve_and_measure(args, checkpoint: Path, workload: Workload, batching: bool, logs: Path,
                            raw: RawForward, raw_rate: float) -> list[dict]:
    """``raw_rate``: the raw forward's tokens/s at the start, which sizes the runs."""
    import aiohttp

    flags = ["--max-batch-tokens", str(args.max_batch_tokens), "--device", args.device,
             "--max-documents", "1000"]
    if args.max_length:
        flags += ["--max-length", str(args.max_length)]
    if args.attention:
        flags += ["--attention", args.attention]
    if not batching:
        flags.append("--no-batching")
    runs = []
    server = Server(checkpoint, logs / f"server-{'batching' if batching else 'no-batching'}.log", *flags,
                    threads=args.server_threads)
    try:
        connector = aiohttp.TCPConnector(limit=max(args.concurrency) + 8)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await server.wait_ready(session)
            for kind in args.transports:
                transport = Transport(kind, server, workload, session)
                for i in range(4):  # warm-up, and a check that the token counts agree with the server's
                    assert await transport.send(i), f"warm-up request {i} over {kind} failed"
                if kind == "rest":
                    async with session.post(server.url + "/v1/rerank", data=transport.bodies[0],
                                            headers={"Content-Type": "application/json"}) as r:
                        usage = (await r.json())["usage"]["prompt_tokens"]
                    assert usage == workload.tokens[0], (usage, workload.tokens[0])
                best_rate = 0.0
                for concurrency in (args.concurrency if batching else [c for c in args.concurrency if c > 1]):
                    top = batching and concurrency == max(args.concurrency)
                    neighbours = [raw.measure()] if top else []
                    before = await server.metrics(session)
                    with Recorder(server, workload) as rec:
                        await closed_loop(transport, rec, concurrency,
                                          closed_loop_requests(args, concurrency, raw_rate, workload))
                    await server.idle(session)
                    after = await server.metrics(session)
                    run = rec.summary(transport=kind, batching=batching, mode=f"{concurrency} clients",
                                      concurrency=concurrency)
                    run["server_batches"] = batch_stats(before, after)
                    if top:
                        neighbours.append(raw.measure())
                        run["raw_forward_neighbours"] = neighbours
                        run["fraction_of_raw_forward"] = run["tokens_per_s"] / statistics.fmean(
                            r["tokens_per_s"] for r in neighbours)
                    runs.append(run)
                    print_run(run)
                    best_rate = max(best_rate, run["requests_per_s"])
                for arrivals in ARRIVALS if batching and best_rate > 0 and not args.skip_open_loop else ():
                    rate = best_rate / 2
                    before = await server.metrics(session)
                    with Recorder(server, workload) as rec:
                        sent = await open_loop(transport, rec, rate, args.open_loop_requests, arrivals, args.seed)
                    after = await server.metrics(session)
                    run = rec.summary(transport=kind, batching=batching, mode=f"half load, {arrivals}",
                                      arrivals=arrivals, offered_rate=rate, saturating_rate=best_rate, sent=sent)
                    run["server_batches"] = batch_stats(before, after)
                    lat = run["latency_s"]
                    run["p99_over_p50"] = lat["p99"] / lat["p50"] if lat["p50"] else None
                    ideal = ideal_fifo_latencies(rec.sent, workload, raw_rate, args.max_batch_tokens)
                    run["ideal_fifo"] = {q: percentile(ideal, v)
                                         for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
                    run["ideal_fifo"]["p99_over_p50"] = run["ideal_fifo"]["p99"] / run["ideal_fifo"]["p50"]
                    runs.append(run)
                    print_run(run)
                await transport.close()
                await server.idle(session)
    finally:
        code = server.stop()
        if code != 0:
            print(f"warning: the server exited with {code}; log in {server.log_path}", file=sys.stderr)
    return runs


def batch_stats(before: dict, after: dict) -> dict:
    forwards = after.get("rerank_batch_pairs_count", 0) - before.get("rerank_batch_pairs_count", 0)
    pairs = after.get("rerank_batch_pairs_sum", 0) - before.get("rerank_batch_pairs_sum", 0)
    tokens = after.get("rerank_batch_tokens_sum", 0) - before.get("rerank_batch_tokens_sum", 0)
    stages = {}
    for stage in ("tokenize", "queue", "inference"):
        key = f'rerank_stage_seconds_{{}}{{{{stage="{stage}"}}}}'
        n = after.get(key.format("count"), 0) - before.get(key.format("count"), 0)
        stages[stage] = (after.get(key.format("sum"), 0) - before.get(key.format("sum"), 0)) / n if n else None
    return {"forwards": int(forwards), "pairs_per_forward": pairs / forwards if forwards else None,
            "tokens_per_forward": tokens / forwards if forwards else None,
            "mean_stage_seconds_per_request": stages}


def machine_load(runs: list[dict], raw_runs: list[dict]) -> dict:
    """How busy the rest of the machine was (``foreign`` CPUs: other processes than the server
    and this client): the worst run, the mean over runs, and which runs had others above
    ``MachineLoad.CONTENDED_SHARE`` of the machine, so that a results file says whether it was taken under load."""
    cpus, share = os.cpu_count() or 1, MachineLoad.CONTENDED_SHARE
    foreign = {f"{r['transport']} {'on' if r['batching'] else 'off'} {r['mode']}": r["cpus"]["foreign"]
               for r in runs if r["cpus"]["foreign"] is not None}
    raw = [r["foreign_cpus_max"] for r in raw_runs + [n for r in runs for n in r.get("raw_forward_neighbours", [])]
           if r.get("foreign_cpus_max") is not None]
    everything = list(foreign.values()) + raw
    contended = [name for name, f in foreign.items() if f > share * cpus]
    return {"cpus": cpus, "contended_share": share,
            "foreign_cpus_max": max(everything, default=None),
            "foreign_cpus_mean_over_runs": statistics.fmean(foreign.values()) if foreign else None,
            "raw_forward_foreign_cpus_max": max(raw, default=None),
            "contended_runs": contended, "contended": bool(contended) or any(f > share * cpus for f in raw)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="model directory (default: a random checkpoint of --size)")
    p.add_argument("--size", choices=("tiny", "small"), default="small",
                   help="random checkpoint, checkpoints/<size>-random, written if absent (default small; see above)")
    p.add_argument("--quick", action="store_true", help="short runs, small workload: a smoke test of this script")
    p.add_argument("--duration", type=float,
                   help="seconds per closed-loop run at the raw forward's rate (default 20; 2 quick)")
    p.add_argument("--open-loop-requests", type=int,
                   help="requests sent at half load, enough for a p99 (default 300; 40 quick)")
    p.add_argument("--concurrency", default="1,8,64", help="comma-separated client counts (default 1,8,64)")
    p.add_argument("--transports", default="rest,grpc", help="comma-separated subset of rest,grpc")
    p.add_argument("--requests", type=int, help="distinct requests in the workload (default 256; 32 quick)")
    p.add_argument("--raw-passes", type=int, default=3,
                   help="timed passes of the raw forward, before and after serving")
    p.add_argument("--max-batch-tokens", type=int, help="the server's --max-batch-tokens (default: its default "
                                                       "for the device)")
    p.add_argument("--max-length", type=int, help="the server's --max-length (default: the model's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--attention", help="the server's --attention (default: its choice)")
    p.add_argument("--server-threads", type=int,
                   help="OMP/MKL threads of the server's forward (default: torch's choice, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-no-batching", action="store_true", help="skip the --no-batching server")
    p.add_argument("--skip-open-loop", action="store_true", help="skip the half-load latency run")
    p.add_argument("--out", type=Path,
                   help="results file (default benchmarks/results/load-<checkpoint>-<device>-<date>.json)")
    args = p.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 20.0)
    args.open_loop_requests = args.open_loop_requests or (40 if args.quick else 300)
    args.requests = args.requests or (32 if args.quick else 256)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.transports = [t.strip() for t in args.transports.split(",")]
    if not set(args.transports) <= {"rest", "grpc"}:
        p.error("--transports: rest and/or grpc")
    return args


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    checkpoint = (args.checkpoint or ensure_checkpoint("tiny" if args.quick else args.size)).resolve()
    if args.max_batch_tokens is None:
        from rerank_server.config import default_max_batch_tokens
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.max_batch_tokens = default_max_batch_tokens(cuda, args.max_length or 0)
    started = time.perf_counter()
    workload = make_workload(checkpoint, args.requests, args.seed, args.max_length)
    docs = [len(d) for d in workload.documents]
    print(f"workload: {len(workload)} requests, {min(docs)}-{max(docs)} documents each "
          f"(mean {statistics.fmean(docs):.0f}), "
          f"{statistics.fmean(workload.tokens):.0f} tokens per request on average, "
          f"{statistics.fmean(len(p) for ps in workload.pairs for p in ps):.1f} per pair; checkpoint {checkpoint}",
          flush=True)

    print(f"raw forward (Engine.forward in-process, batches of <= {args.max_batch_tokens} tokens):", flush=True)
    raw_forward = RawForward(checkpoint, workload, args.device, args.max_length, args.max_batch_tokens,
                             args.duration, args.attention, args.raw_passes)
    raw = raw_forward.measure()
    print_raw(raw)

    logs = Path(tempfile.mkdtemp(prefix="rerank-load-"))  # the servers' logs
    print("serving (closed loop; then open loop at half the best rate):", flush=True)
    runs = asyncio.run(serve_and_measure(args, checkpoint, workload, True, logs, raw_forward, raw["tokens_per_s"]))
    if not args.skip_no_batching:
        print("serving with --no-batching (one request per forward):", flush=True)
        runs += asyncio.run(serve_and_measure(args, checkpoint, workload, False, logs, raw_forward,
                                              raw["tokens_per_s"]))

    print("raw forward again, after the servers:", flush=True)
    raw_after = raw_forward.measure()
    print_raw(raw_after)
    raw_runs = [raw, raw_after]
    raw = max(raw_runs, key=lambda r: r["tokens_per_s"])
    for r in runs:  # the top runs have their neighbours' rate; the others the best of the run's ends
        r.setdefault("fraction_of_raw_forward", r["tokens_per_s"] / raw["tokens_per_s"])
    top = max(args.concurrency)
    summary, targets = {}, {}
    print("summary:")
    for kind in args.transports:
        on = next((r for r in runs if r["transport"] == kind and r["batching"] and r.get("concurrency") == top), None)
        off = next((r for r in runs if r["transport"] == kind and not r["batching"] and r.get("concurrency") == top),
                   None)
        entry = {}
        if on:
            entry["fraction_of_raw_at_top_concurrency"] = on["fraction_of_raw_forward"]
            targets[f"{kind}_serving/raw_at_{top}_clients>={TARGET_FRACTION_OF_RAW}"] = {
                "value": on["fraction_of_raw_forward"], "pass": on["fraction_of_raw_forward"] >= TARGET_FRACTION_OF_RAW}
            rates = " and ".join(f"{r['tokens_per_s']:.0f}" for r in on["raw_forward_neighbours"])
            print(f"  {kind}: serving at {top} clients = {on['fraction_of_raw_forward']:.1%} of the raw forward's "
                  f"tokens/s measured right before and after it ({rates}) (target >= {TARGET_FRACTION_OF_RAW:.0%})")
        if on and off:
            entry["batching_speedup_at_top_concurrency"] = on["tokens_per_s"] / off["tokens_per_s"]
            print(f"  {kind}: batching on / off at {top} clients: {entry['batching_speedup_at_top_concurrency']:.2f}x "
                  f"tokens/s, p50 {on['latency_s']['p50'] * 1000:.0f} vs {off['latency_s']['p50'] * 1000:.0f} ms")
        for half in (r for r in runs if r["transport"] == kind and r.get("arrivals")):
            if half["p99_over_p50"] is None:
                continue
            arrivals = half["arrivals"]
            entry[f"half_load_{arrivals}_p99_over_p50"] = half["p99_over_p50"]
            targets[f"{kind}_half_load_{arrivals}_p99<={TARGET_P99_OVER_P50}xp50"] = {
                "value": half["p99_over_p50"], "pass": half["p99_over_p50"] <= TARGET_P99_OVER_P50}
            entry[f"half_load_{arrivals}_ideal_fifo_p99_over_p50"] = half["ideal_fifo"]["p99_over_p50"]
            print(f"  {kind}: at half load ({half['offered_rate']:.1f} req/s offered, {arrivals}): "
                  f"{fmt_latency(half['latency_s'])}, p99/p50 = {half['p99_over_p50']:.2f} (target <= "
                  f"{TARGET_P99_OVER_P50}); an ideal FIFO server on the same arrivals: "
                  f"{fmt_latency(half['ideal_fifo'])}, p99/p50 = {half['ideal_fifo']['p99_over_p50']:.2f}")
        summary[kind] = entry
    for name, t in targets.items():
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {name}: {t['value']:.3f}")

    describe = device_description(torch.device("cpu"))  # the client and the server share it
    device_name = "cpu-" + slug(describe) if raw["device"] == "cpu" else slug(raw["device"])
    if raw["device"].startswith("cuda"):
        device_name = slug(torch.cuda.get_device_name())
    date = datetime.date.today().isoformat()
    model_name = slug(checkpoint.name)
    out = args.out or RESULTS_DIR / f"load-{model_name}-{device_name}-{date}{'-quick' if args.quick else ''}.json"
    config = json.loads((checkpoint / "config.json").read_text())
    record = {
        "benchmark": "load",
        "date": date,
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": {"description": describe, "logical_cpus": os.cpu_count(),
                   "memory_bytes": psutil.virtual_memory().total},
        "git": git_commit(),
        "python": sys.version.split()[0],
        "quick": args.quick,
        "model": {"checkpoint": str(checkpoint.relative_to(REPO) if checkpoint.is_relative_to(REPO) else checkpoint),
                  "layers": config["num_hidden_layers"], "hidden": config["hidden_size"]},
        "settings": {"duration_s": args.duration, "open_loop_requests": args.open_loop_requests,
                     "concurrency": args.concurrency, "transports": args.transports,
                     "max_batch_tokens": args.max_batch_tokens, "max_length": args.max_length, "seed": args.seed,
                     "server_threads": args.server_threads},
        "workload": {"requests": len(workload), "documents_min": min(docs), "documents_max": max(docs),
                     "documents_mean": statistics.fmean(docs),
                     "tokens_per_request_mean": statistics.fmean(workload.tokens),
                     "tokens_per_pair_mean": statistics.fmean(len(p) for ps in workload.pairs for p in ps)},
        "raw_forward": raw,
        "raw_forward_runs": raw_runs,
        "runs": runs,
        "summary": summary,
        "targets": targets,
        "machine_load": machine_load(runs, raw_runs),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out} in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
