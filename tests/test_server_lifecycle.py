"""The process around the API: health while loading, signals, start-up failures, and
configuration through RERANK_* environment variables. Each test starts its own server."""
from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import SERVED_MODEL, error_lines, free_port, start_server, wait_exit

from rerank_server.config import parse_args
from rerank_server.engine import Engine
from rerank_server.tokenization import PairTokenizer

pytestmark = [pytest.mark.serving, pytest.mark.slow]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class StartupTrace:
    rest: list = field(default_factory=list)  # "refused", "timeout" or (status, body)
    grpc: list = field(default_factory=list)  # a health status or an RpcError code
    rest_latency: list = field(default_factory=list)  # seconds per answered /health while not yet serving
    inflight: requests.Response | None = None
    stop_seconds: float = 0.0
    exit_code: int | None = None
    after_stop: list = field(default_factory=list)
    log: str = ""


def poll_until_serving(server, trace: StartupTrace, timeout: float = 120) -> None:
    # Reconnect quickly: by default a refused channel backs off for seconds, failing calls fast
    # with UNAVAILABLE meanwhile, and the NOT_SERVING window would go unseen.
    channel = grpc.insecure_channel(server.grpc_address, options=[
        ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 100)])
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.log()
            started = time.monotonic()
            try:
                r = requests.get(server.http_url + "/health", timeout=10)
                trace.rest.append((r.status_code, r.json()))
                if r.status_code != 200:
                    trace.rest_latency.append(time.monotonic() - started)
            except requests.ConnectionError:
                trace.rest.append("refused")
            except requests.Timeout:
                trace.rest.append("timeout")
            try:
                trace.grpc.append(health.Check(health_pb2.HealthCheckRequest(service="rerank.v1.Rerank"),
                                               timeout=10).status)
            except grpc.RpcError as e:
                trace.grpc.append(e.code())
            if trace.rest[-1] == (200, {"status": "SERVING"}) and trace.grpc[-1] == SERVING:
                return
            time.sleep(0.05)
        raise AssertionError(f"not serving in {timeout} s:\n{server.log()}")
    finally:
        channel.close()


@pytest.fixture(scope="module")
def startup(small_checkpoint, tmp_path_factory) -> StartupTrace:
    """One server started without waiting: its health observed from the first moment, one
    request in flight when SIGTERM arrives, then the exit. The small model (6 x 384, 436 MB)
    takes long enough to load for the NOT_SERVING window to be seen; the tiny one loads in
    a blink once its tokenizer is parsed before the listeners start."""
    checkpoint = small_checkpoint
    trace = StartupTrace()
    server = start_server(checkpoint, tmp_path_factory.mktemp("logs") / "startup.log", wait=False)
    try:
        poll_until_serving(server, trace)
        body = {"model": SERVED_MODEL, "query": "q", "documents": [f"word{i} " * 300 for i in range(16)]}

        def send():
            trace.inflight = requests.post(server.http_url + "/v1/rerank", json=body, timeout=60)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.3)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        sender.join(60)
        trace.exit_code = server.process.wait(30)
        trace.stop_seconds = time.monotonic() - started
        try:
            trace.after_stop.append(requests.get(server.http_url + "/health", timeout=2).status_code)
        except requests.ConnectionError:
            trace.after_stop.append("refused")
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        trace.log = server.log()
    return trace


def test_rest_health_not_serving_until_loaded(startup):
    first = startup.rest.index((200, {"status": "SERVING"}))
    before = startup.rest[:first]
    allowed = ["refused", "timeout", (503, {"status": "NOT_SERVING"})]
    assert all(x in allowed for x in before), before
    assert (503, {"status": "NOT_SERVING"}) in before, f"never saw 503 while loading: {startup.rest}"


def test_grpc_health_not_serving_then_serving(startup):
    first = startup.grpc.index(SERVING)
    before = startup.grpc[:first]
    assert all(x in (NOT_SERVING, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
               for x in before), before
    assert NOT_SERVING in before, f"never saw NOT_SERVING while loading: {startup.grpc}"


def test_health_answers_promptly_while_loading(startup):
    """/health answers while the model loads and the CPU GEMMs are measured, in milliseconds on
    an idle machine (Kubernetes' default probe timeout is 1 s); the bound leaves a loaded 2-core
    machine room while still catching a loop blocked for the load. The tokenizer, whose parsing
    holds the GIL for about a second, is loaded before the listeners start."""
    assert startup.rest_latency and max(startup.rest_latency) < 2.0, startup.rest_latency


def test_sigterm_finishes_inflight_request_and_exits_0(startup):
    assert startup.inflight is not None and startup.inflight.status_code == 200, startup.log
    assert len(startup.inflight.json()["results"]) == 16
    assert startup.exit_code == 0, startup.log
    # the drain ends with the last request, not at the end of the default 30 s grace
    assert startup.stop_seconds < 30, startup.stop_seconds
    assert startup.after_stop == ["refused"]
    assert "Traceback" not in startup.log, startup.log


def env_config(tiny_checkpoint, http_port: int, grpc_port: int, **more: str) -> dict[str, str]:
    return {"RERANK_MODEL": str(tiny_checkpoint), "RERANK_SERVED_MODEL_NAME": f"{SERVED_MODEL},reranker",
            "RERANK_HOST": "127.0.0.1", "RERANK_HTTP_PORT": str(http_port), "RERANK_GRPC_PORT": str(grpc_port),
            **more}


def test_environment_variables_and_sigint(tiny_checkpoint, tmp_path):
    """RERANK_<FLAG> stands for every flag; then SIGINT stops the server like SIGTERM."""
    env = env_config(tiny_checkpoint, free_port(), free_port(), RERANK_MAX_DOCUMENTS="3", RERANK_MAX_LENGTH="32",
                     RERANK_MAX_REQUEST_BYTES="5000", RERANK_SHUTDOWN_GRACE="300")
    server = start_server(None, tmp_path / "env.log", env=env, flags=False)
    try:
        url = server.http_url + "/v1/rerank"
        assert server.http_url.endswith(env["RERANK_HTTP_PORT"])
        long_doc = "Reranking models score every pair of query and document. " * 20
        r = requests.post(url, timeout=30, json={"model": "reranker", "query": "what is reranking?",
                                                  "documents": ["short", long_doc]})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["model"] == SERVED_MODEL  # RERANK_SERVED_MODEL_NAME, comma-separated
        assert data["usage"]["prompt_tokens"] <= 2 * 32  # RERANK_MAX_LENGTH
        alone = requests.post(url, timeout=30, json={"model": SERVED_MODEL, "query": "q", "documents": [long_doc]})
        assert alone.json()["usage"]["prompt_tokens"] == 32
        r = requests.post(url, timeout=30, json={"model": SERVED_MODEL, "query": "q", "documents": ["a"] * 4})
        assert r.status_code == 400 and "3" in r.json()["message"]  # RERANK_MAX_DOCUMENTS
        r = requests.post(url, timeout=30, json={"model": SERVED_MODEL, "query": "q", "documents": ["a" * 6000]})
        assert r.status_code == 413  # RERANK_MAX_REQUEST_BYTES
        with grpc.insecure_channel(f"127.0.0.1:{env['RERANK_GRPC_PORT']}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == SERVING  # RERANK_GRPC_PORT
        # idle, it exits without waiting out its grace (RERANK_SHUTDOWN_GRACE: 300 s)
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 0, server.log()
        assert "Traceback" not in server.log() and "KeyboardInterrupt" not in server.log(), server.log()
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_missing_model_directory_exits_nonzero_with_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-model"
    server = start_server(missing, tmp_path / "missing.log", wait=False)
    code, log = wait_exit(server)
    assert code != 0, log
    errors = error_lines(log)
    assert len(errors) == 1, log
    assert "--model" in errors[0] and str(missing) in errors[0], errors[0]
    assert "Traceback" not in log, log


def test_offline_hub_id_without_cache_says_how_to_point_at_a_directory(tmp_path):
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    server = start_server("some-org/some-model", tmp_path / "offline.log", wait=False, env=env)
    code, log = wait_exit(server)
    assert code != 0, log
    errors = error_lines(log)
    assert len(errors) == 1, log
    line = errors[0]
    assert "some-org/some-model" in line
    assert re.search(r"--model \S*dir|director", line), line  # how to point at a local directory
    assert "Traceback" not in log, log
    assert not any(hf_home.rglob("*.safetensors"))


@pytest.mark.parametrize("problem", ["no tokenizer.json", "max length beyond the model's"])
def test_a_checkpoint_the_tokenizer_cannot_serve_exits_nonzero_with_one_clear_line(tiny_checkpoint, tmp_path, problem):
    """The tokenizer is loaded before the listeners start: its errors end the start-up as
    cleanly as the weights' do."""
    checkpoint, extra = tiny_checkpoint, []
    if problem == "no tokenizer.json":
        checkpoint = tmp_path / "no-tokenizer"
        checkpoint.mkdir()
        for name in ("config.json", "model.safetensors"):
            (checkpoint / name).symlink_to(tiny_checkpoint / name)
    else:
        extra = ["--max-length", "100000"]
    server = start_server(checkpoint, tmp_path / "server.log", *extra, wait=False)
    code, log = wait_exit(server)
    assert code == 2, log
    errors = error_lines(log)
    assert len(errors) == 1, log
    assert ("tokenizer.json" if problem == "no tokenizer.json" else "--max-length") in errors[0], errors[0]
    assert "Traceback" not in log, log


def test_all_torch_work_runs_on_one_thread(tiny_checkpoint, monkeypatch):
    """Loading, warm-up and every forward run on one thread, never the event loop's: each
    thread that runs a parallel CPU op gets its own OpenMP team, and a second team on the
    same cores slows every op (see rerank_server.__main__). The server runs in this process."""
    import asyncio

    import aiohttp

    from rerank_server import __main__ as entry

    seen: dict[str, set[str]] = {"load": set(), "warm_up": set(), "launch": set()}

    def recorded(name, fn):
        def wrapper(*args, **kwargs):
            seen[name].add(threading.current_thread().name)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Engine, "load", recorded("load", Engine.load))
    monkeypatch.setattr(Engine, "warm_up", recorded("warm_up", Engine.warm_up))
    monkeypatch.setattr(Engine, "launch", recorded("launch", Engine.launch))
    http_port = free_port()
    config = parse_args(["--model", str(tiny_checkpoint), "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1",
                         "--http-port", str(http_port), "--grpc-port", str(free_port()), "--device", "cpu"])

    async def scenario() -> tuple[int, list]:
        stop = asyncio.Event()
        serving = asyncio.create_task(entry.serve(config, stop))
        url = f"http://127.0.0.1:{http_port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                assert not serving.done(), "the server stopped while starting"
                try:
                    async with session.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            bodies = [{"model": SERVED_MODEL, "query": f"q{i}", "documents": ["a b c", f"d {i}"]} for i in range(4)]

            async def post(body):
                async with session.post(url + "/v1/rerank", json=body) as r:
                    return r.status
            statuses = await asyncio.gather(*(post(b) for b in bodies))
        stop.set()
        return await serving, statuses

    status, statuses = asyncio.run(scenario())
    assert status == 0 and statuses == [200] * 4
    threads = set().union(*seen.values())
    assert all(seen.values()), seen
    assert len(threads) == 1 and threading.main_thread().name not in threads, seen


def test_max_length_has_one_rule(tiny_checkpoint, capsys):
    """--max-length: at least 8 (checked with the flags) and at most the model's limit (checked
    once the checkpoint is read); the tokenizer holds the same rule."""
    with pytest.raises(SystemExit) as e:
        parse_args(["--max-length", "7"])
    assert e.value.code == 2 and "--max-length must be at least 8, got 7" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max-length must be at least 8, got 7"):
        PairTokenizer(tiny_checkpoint / "tokenizer.json", 7)
    with pytest.raises(ValueError, match="--max-length must be at least 8 and at most the model's 8192, got 8193"):
        Engine.load_tokenizer(tiny_checkpoint, 8193)
    assert Engine.load_tokenizer(tiny_checkpoint, 8).max_length == 8
