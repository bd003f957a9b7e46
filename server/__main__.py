"""rerank-server (or python -m rerank_server) --model <dir or hub id> [flags]: gRPC and REST in one process."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from aiohttp import web

from rerank_server.config import Config, default_max_batch_tokens, parse_args
from rerank_server.engine import Engine
from rerank_server.grpc_server import build_grpc_server, set_serving
from rerank_server.rest import build_app
from rerank_server.scheduler import Scheduler
from rerank_server.service import RerankService, request_id_var

log = logging.getLogger("rerank_server")


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    """Serves until SIGINT/SIGTERM (or ``stop`` is set), then drains. -> the exit status."""
    loop = asyncio.get_running_loop()
    tokenizer = None
    local_dir = Path(config.model).expanduser()
    if local_dir.is_dir():
        # Parsed before the listeners start: tokenizers holds the GIL for about a second while
        # it parses tokenizer.json, which would leave health probes unanswered meanwhile. (A hub
        # id is resolved, maybe downloaded, in the background below; its parse stalls there.)
        try:
            tokenizer = Engine.load_tokenizer(local_dir, config.max_length)
        except Exception as e:
            log.error("cannot start: %s", e)
            return 2
    limits = dict(max_request_bytes=config.max_request_bytes, http_port=config.http_port,
                  grpc_port=config.grpc_port, auth=bool(config.api_keys), tls=bool(config.tls_cert),
                  batching=config.batching)
    service = RerankService(config.served_model_name, config.max_documents, config.api_keys, settings=limits)

    credentials, ssl_context = None, None
    if config.tls_cert:
        with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    grpc_server, health = build_grpc_server(service, f"{config.host}:{config.grpc_port}",
                                            config.max_request_bytes, credentials)
    await set_serving(health, False)
    await grpc_server.start()
    # handler_cancellation: a client that disconnects cancels its handler, so its queued pairs are dropped
    runner = web.AppRunner(build_app(service, config.max_request_bytes, config.metrics_auth,
                                     document_objects=config.document_objects), access_log=None,
                           shutdown_timeout=config.shutdown_grace, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.http_port, ssl_context=ssl_context).start()
    scheme = "https" if ssl_context else "http"
    log.info("listening: REST %s://%s:%d (POST /v1/rerank, /rerank; GET /health, /metrics, /info), gRPC %s:%d%s; "
             "auth %s", scheme, config.host, config.http_port, config.host, config.grpc_port,
             " (TLS)" if credentials else "", f"on ({len(config.api_keys)} keys)" if config.api_keys else "off")

    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # All torch work (loading, warm-up, every forward) runs on this one thread. Each thread that
    # runs a parallel CPU op gets its own OpenMP team, and once the teams' threads outnumber the
    # cores libgomp barely spins between parallel regions: every op then pays a futex wake-up
    # (measured on 2 cores: the tiny model's forward 2.5x slower, the small model's ~1.25x).
    device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")

    async def load() -> None:
        engine = await loop.run_in_executor(
            device_thread, lambda: Engine.load(config.model, config.device, config.max_length, config.attention, tokenizer))
        await loop.run_in_executor(device_thread, engine.warm_up)
        max_batch_tokens = config.max_batch_tokens or default_max_batch_tokens(engine.asynchronous, config.max_length or 0)
        scheduler = Scheduler(engine.launch, max_batch_tokens, config.max_queued_tokens,
                              on_batch=service.metrics.observe_batch, batch_requests=config.batching,
                              in_flight=2 if engine.asynchronous else 1, device_thread=device_thread)
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
        log.info("stopping: no new requests; finishing accepted ones (grace %.0fs)", config.shutdown_grace)
    loading.cancel()
    service.draining = True
    await set_serving(health, False)
    await asyncio.gather(runner.cleanup(), grpc_server.stop(config.shutdown_grace))
    if service.scheduler:
        await service.scheduler.close()
    else:
        device_thread.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")
    return status


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": record.request_id, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if config.log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logging.basicConfig(level=config.log_level, handlers=[handler])


def main(argv: list[str] | None = None) -> None:
    """``rerank-server [flags]`` serves; ``rerank-server checkpoint ...`` writes a random checkpoint."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["checkpoint"]:
        from rerank_server.checkpoint import main as checkpoint_main
        return checkpoint_main(argv[1:])
    config = parse_args(argv)
    setup_logging(config)
    sys.exit(asyncio.run(serve(config)))


if __name__ == "__main__":
    main()
