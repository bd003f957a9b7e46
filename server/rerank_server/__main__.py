"""rerank-server (or python -m rerank_server) --model <dir or hub id> [flags]: gRPC and REST in one process."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from aiohttp import web

from rerank_kernels import resolve_dtype
from rerank_server.config import Config, default_max_batch_tokens, parse_args
from rerank_server.engine import Engine, ModelNotFoundError, could_be_hub_id, resolve_device, resolve_model_dir
from rerank_server.grpc_server import build_grpc_server, connection_options, set_serving
from rerank_server.limits import GuardedSite
from rerank_server.logs import setup_logging
from rerank_server.rest import build_app
from rerank_server.scheduler import Scheduler
from rerank_server.schema import SERVICE
from rerank_server.service import RerankService

log = logging.getLogger("rerank_server")


def _check_port_free(host: str, port: int, what: str) -> None:
    """Raises StartupError if ``host:port`` cannot be bound exclusively (a listener is there).
    gRPC's own bind failure is a C-core log line plus a RuntimeError; this says it in one line."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"--host {host!r}: {e.strerror}") from None
    for family, kind, proto, _, address in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do: TIME_WAIT is fine
            try:
                probe.bind(address)
            except OSError as e:
                raise StartupError(f"cannot listen for {what} on {host}:{port}: {e.strerror}") from None


class StartupError(RuntimeError):
    """The server cannot start (a port in use, an unreadable TLS file): exit 2 with this line."""


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    """Serves until SIGINT/SIGTERM (or ``stop`` is set), then drains. -> the exit status."""
    loop = asyncio.get_running_loop()
    tokenizer = None
    local_dir = Path(config.model).expanduser()
    try:
        resolve_dtype(resolve_device(config.device), config.dtype)  # e.g. bfloat16 on a CPU without it: exit 2
        if local_dir.is_dir() or not could_be_hub_id(config.model):
            # Parsed before the listeners start: tokenizers holds the GIL for about a second while
            # it parses tokenizer.json, which would leave health probes unanswered meanwhile. (A hub
            # id is resolved, maybe downloaded, in the background below; its parse stalls there.)
            # A path that is no directory fails here, before anything listens.
            tokenizer = Engine.load_tokenizer(resolve_model_dir(config.model), config.max_length)
        credentials, ssl_context = _tls(config)
        _check_port_free(config.host, config.grpc_port, "gRPC")
        _check_port_free(config.host, config.http_port, "REST")
    except (StartupError, ModelNotFoundError, ValueError) as e:
        log.error("cannot start: %s", e)
        return 2
    connections = config.connection_limits
    limits = dict(max_request_bytes=config.max_request_bytes, http_port=config.http_port,
                  grpc_port=config.grpc_port, auth=bool(config.api_keys), tls=bool(config.tls_cert),
                  batching=config.batching, document_objects=config.document_objects,
                  http_idle_timeout=connections.idle_timeout, http_body_timeout=connections.body_timeout,
                  http_max_connections=connections.max_connections)
    service = RerankService(config.served_model_name, config.max_documents, config.api_keys, settings=limits,
                            max_request_tokens=config.max_request_tokens)

    grpc_server, health = build_grpc_server(
        service, f"{config.host}:{config.grpc_port}", config.max_request_bytes, credentials, connections,
        connection_options(config.max_connection_age, config.max_connection_age_grace))
    await set_serving(health, False)
    await grpc_server.start()
    # handler_cancellation: a client that disconnects cancels its handler, so its queued pairs are dropped
    runner = web.AppRunner(build_app(service, config.max_request_bytes, config.metrics_auth,
                                     document_objects=config.document_objects, body_timeout=connections.body_timeout),
                           access_log=None, shutdown_timeout=2, handler_cancellation=True,
                           lingering_time=2.0)  # what is left of an unread body (a refusal) is skipped for 2 s at most
    await runner.setup()
    try:
        await GuardedSite(runner, config.host, config.http_port, connections, service.metrics,
                          ssl_context=ssl_context).start()
    except OSError as e:  # taken between the check and now
        log.error("cannot start: cannot listen for REST on %s:%d: %s", config.host, config.http_port, e.strerror)
        await asyncio.gather(runner.cleanup(), grpc_server.stop(0))
        return 2
    scheme = "https" if ssl_context else "http"
    log.info("listening: REST %s://%s:%d (%s), gRPC %s:%d%s (%s, grpc.health.v1, reflection); auth %s",
             scheme, config.host, config.http_port, ", ".join(route_list(runner.app)), config.host, config.grpc_port,
             " (TLS)" if credentials else "", ", ".join(m.full_name for m in SERVICE.methods),
             f"on ({len(config.api_keys)} keys)" if config.api_keys else "off")

    stop = stop or asyncio.Event()
    failure: list[BaseException] = []  # the scheduler's, if it dies: exit non-zero

    def on_scheduler_failure(error: BaseException) -> None:
        """Inference cannot go on: stop serving (health NOT_SERVING at once) and exit non-zero,
        so that an orchestrator replaces this process."""
        failure.append(error)
        service.failed = True
        loop.create_task(set_serving(health, False))
        stop.set()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # the second signal: no more waiting
            log.warning("%s again: exiting at once", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    # All torch work (loading, warm-up, every forward) runs on this one thread. Each thread that
    # runs a parallel CPU op gets its own OpenMP team, and once the teams' threads outnumber the
    # cores libgomp barely spins between parallel regions: every op then pays a futex wake-up
    # (measured on 2 cores: the tiny model's forward 2.5x slower, the small model's ~1.25x).
    device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")

    async def load() -> None:
        engine = await loop.run_in_executor(device_thread, lambda: Engine.load(
            config.model, config.device, config.max_length, config.attention, tokenizer, config.dtype, config.cpu_gemm))
        await loop.run_in_executor(device_thread, engine.warm_up)
        max_batch_tokens = (config.max_batch_tokens
                            or default_max_batch_tokens(engine.asynchronous, config.max_length or 0))
        scheduler = Scheduler(engine.launch, max_batch_tokens, config.max_queued_tokens,
                              on_batch=service.metrics.observe_batch, batch_requests=config.batching,
                              in_flight=2 if engine.asynchronous else 1, device_thread=device_thread,
                              on_fatal=on_scheduler_failure)
        scheduler.start()
        service.attach(engine, scheduler)
        await set_serving(health, True)
        log.info("serving model %s (aliases: %s)", service.model_id, ", ".join(config.served_model_name[1:]) or "none")

    loading = asyncio.create_task(load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if loading.done() and loading.exception():
        log.error("cannot start: %s", loading.exception())
        status = 2
    else:
        await stopping
        if failure:
            log.critical("exiting: the scheduler failed (%s); a restart is needed", failure[0])
            status = 1
    loading.cancel()
    # Draining: both listeners stay open, so health answers NOT_SERVING / 503 and new requests
    # get 503 / UNAVAILABLE until the process exits; accepted ones finish within the grace.
    service.draining = True
    await set_serving(health, False)
    if status == 0:
        await drain(service, config.shutdown_grace)
    await asyncio.gather(runner.cleanup(), grpc_server.stop(1))
    if service.scheduler:
        await service.scheduler.close()
    device_thread.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")
    return status


async def drain(service: RerankService, grace: float) -> None:
    """Waits up to ``grace`` seconds for the requests in flight; those still running then are
    answered 503 / UNAVAILABLE (never a reset connection or an empty reply)."""
    accepted = service.in_flight
    log.info("stopping: no new requests; finishing %d accepted ones (grace %gs)", accepted, grace)
    deadline = time.monotonic() + grace
    while service.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    cut = service.in_flight
    if cut:
        service.cut_off(f"the server is shutting down: this request did not finish within the shutdown grace "
                        f"of {grace:g} s; retry it (on another replica)")
        answered = time.monotonic() + 5
        while service.in_flight and time.monotonic() < answered:
            await asyncio.sleep(0.02)
    log.info("drained: %d of %d accepted requests finished, %d cut at the end of the grace",
             max(accepted - cut, 0), accepted, cut)


def _tls(config: Config):
    """-> (gRPC server credentials, SSL context) for --tls-cert/--tls-key, or (None, None)."""
    if not config.tls_cert:
        return None, None
    try:
        with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as e:
        raise StartupError(f"TLS: --tls-cert {config.tls_cert} / --tls-key {config.tls_key} are not a usable "
                           f"PEM certificate and key ({e.reason or e})") from None
    except OSError as e:
        raise StartupError(f"TLS: cannot read {e.filename}: {e.strerror}") from None
    return credentials, ssl_context


def route_list(app: web.Application) -> list[str]:
    """'POST /v1/rerank', 'GET /health', ... for every route of the REST app."""
    routes = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        routes.append(f"{route.method} {route.resource.canonical}")
    return routes


def main(argv: list[str] | None = None) -> None:
    """``rerank-server [flags]`` serves; ``rerank-server checkpoint ...`` writes a random checkpoint."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["checkpoint"]:
        from rerank_server.checkpoint import main as checkpoint_main
        return checkpoint_main(argv[1:])
    config = parse_args(argv)
    setup_logging(config.log_level, config.log_json)
    status = asyncio.run(serve(config))
    busy = [t for t in threading.enumerate() if t.name.startswith("device")]
    for t in busy:
        t.join(timeout=0.5)  # an idle worker exits at once after the executor's shutdown
    if any(t.is_alive() for t in busy):
        # A forward (or a load) still running on the device thread: its result has no caller any
        # more, and waiting for it would hold the exit past the grace.
        log.info("exiting without waiting for the forward still running on the device thread")
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    main()
