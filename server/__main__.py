"""python -m server --model <dir or hub id> [flags]: gRPC and REST in one process."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from server.config import Config, parse_args
from server.engine import Engine
from server.grpc_server import build_grpc_server, set_serving
from server.rest import build_app
from server.scheduler import Scheduler
from server.service import RerankService

log = logging.getLogger("server")


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    service = RerankService(config.served_model_name, config.max_documents)

    grpc_server, health = build_grpc_server(service, f"{config.host}:{config.grpc_port}", config.max_request_bytes)
    await set_serving(health, False)
    await grpc_server.start()
    runner = web.AppRunner(build_app(service, config.max_request_bytes), access_log=None,
                           shutdown_timeout=config.shutdown_grace)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.http_port).start()
    log.info("listening: REST http://%s:%d (POST /v1/rerank, /rerank; GET /health), gRPC %s:%d",
             config.host, config.http_port, config.host, config.grpc_port)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def load() -> Scheduler:
        engine = await loop.run_in_executor(
            None, lambda: Engine.load(config.model, config.device, config.max_length, config.attention))
        await loop.run_in_executor(None, engine.warm_up)
        scheduler = Scheduler(engine.forward, config.max_batch_tokens, config.max_queued_tokens)
        scheduler.start()
        service.attach(engine, scheduler)
        await set_serving(health, True)
        log.info("serving model %s (aliases: %s)", service.model_id, ", ".join(config.served_model_name[1:]) or "none")
        return scheduler

    loading = asyncio.create_task(load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if loading.done() and loading.exception():
        log.error("cannot start: %s", loading.exception())
        status = 2
    else:
        await stopping
        log.info("stopping: finishing accepted requests (grace %.0fs)", config.shutdown_grace)
    loading.cancel()
    await set_serving(health, False)
    await asyncio.gather(runner.cleanup(), grpc_server.stop(config.shutdown_grace))
    if service.scheduler:
        await service.scheduler.close()
    log.info("stopped")
    return status


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(serve(config)))


if __name__ == "__main__":
    main()
