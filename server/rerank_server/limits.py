"""Connection limits of the REST listener (and the gRPC options that match them).

aiohttp has no connection cap and starts reading a request whenever its bytes come, so a few
hundred idle or slow clients could hold every file descriptor. Here:
- at ``max_connections``, a new connection closes the one that has waited longest for a
  request (idle keep-alive, or headers still arriving), so that a health probe always gets in;
  only when every connection is serving a request is the new one answered 503 and closed;
- a connection with no complete request headers within ``idle_timeout`` seconds of opening,
  or of its previous response, is closed: idle keep-alive sockets and headers sent a byte at
  a time share this timer (aiohttp's keep-alive timer, which runs from the connection's start);
- a request body not received within ``body_timeout`` seconds is answered 408 (rerank_server.rest);
- what aiohttp cannot parse is logged as one WARNING line, at most one a second, never with the
  bytes it could not parse (they may hold an API key), and counted in the metrics.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from rerank_server.logs import RateLimitedLog
from rerank_server.metrics import Metrics

log = logging.getLogger(__name__)


def default_max_connections() -> int:
    """A quarter of the open-file limit (the rest: gRPC, the model's files, bursts of accepts
    not yet refused), at most 1024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, min(1024, soft // 4)) if soft != resource.RLIM_INFINITY else 1024


@dataclass(frozen=True)
class ConnectionLimits:
    idle_timeout: float = 15.0  # seconds without complete request headers (REST); without a call (gRPC: longer)
    body_timeout: float = 30.0  # seconds to receive a request body (REST)
    max_connections: int = 1024  # REST connections open at once
    header_timeout: float = 10.0  # gRPC: seconds to finish the HTTP/2 (and TLS) handshake
    max_streams_per_connection: int = 256  # gRPC: calls at once on one connection

    @property
    def grpc_idle_timeout(self) -> float:
        """gRPC channels are long-lived by design and reconnect on GOAWAY: only long idleness ends them."""
        return 20 * self.idle_timeout


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler with a connection cap and one-line, rate-limited errors.
    ``serving`` is set by the REST middleware while a request of this connection is handled."""

    def __init__(self, manager: web.Server, limits: ConnectionLimits, metrics: Metrics, noise: RateLimitedLog,
                 **kwargs):
        super().__init__(manager, keepalive_timeout=limits.idle_timeout, **kwargs)
        self.limits, self.metrics, self.noise = limits, metrics, noise
        self.refused = False
        self.evicted = False
        self.serving = False
        self.waiting_since = time.monotonic()  # since it opened, or since its last response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (closed connections leave the manager's list only once their task has ended)
        open_ones = [h for h in self._manager.connections if not getattr(h, "evicted", False)]
        if len(open_ones) >= self.limits.max_connections and not self._evict_one(open_ones):
            self.refused = True
            self.metrics.malformed_http.labels("over_connection_limit").inc()
            self.noise.warning("REST connection refused: %d connections are open (--http-max-connections)",
                               self.limits.max_connections)
            body = (b'{"code": 14, "message": "too many connections are open; retry shortly", "details": []}')
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            transport.close()
            return
        super().connection_made(transport)

    def _evict_one(self, open_ones: list[RequestHandler]) -> bool:
        """Closes the connection that has waited longest for a request, if any is waiting."""
        waiting = [h for h in open_ones if isinstance(h, GuardedHandler) and not h.serving]
        if not waiting:
            return False
        victim = min(waiting, key=lambda h: h.waiting_since)
        victim.evicted = True
        victim.force_close()  # closes its transport: the descriptor is free before the next accept
        self.metrics.malformed_http.labels("evicted_idle").inc()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)

    def log_exception(self, message: str, *args, exc_info=None, **kwargs) -> None:
        """aiohttp's report of a request it could not parse or answer: one line, without the
        exception's text (it quotes the bytes received: a header, maybe a key)."""
        error = exc_info if isinstance(exc_info, BaseException) else None
        kind = type(error).__name__ if error else "error"
        self.metrics.malformed_http.labels("malformed").inc()
        self.noise.warning("malformed HTTP request from %s: %s", self.peername[0] if self.peername else "?", kind)


class GuardedSite(web.TCPSite):
    """A TCPSite whose connections are GuardedHandlers."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, limits: ConnectionLimits, metrics: Metrics,
                 **kwargs):
        super().__init__(runner, host, port, **kwargs)
        self.limits, self.metrics = limits, metrics
        self.noise = RateLimitedLog(log)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server

        def handler() -> GuardedHandler:  # as web.Server.__call__ builds its RequestHandler
            return GuardedHandler(server, self.limits, self.metrics, self.noise, loop=server._loop,
                                  **{k: v for k, v in server._kwargs.items() if k != "keepalive_timeout"})
        # asyncio accepts up to ``backlog`` connections at once before any is refused or evicted:
        # bounded by the cap, so that a flood cannot take every descriptor in one burst
        backlog = max(8, min(self._backlog, self.limits.max_connections // 2))
        self._server = await asyncio.get_running_loop().create_server(
            handler, self._host, self._port, ssl=self._ssl_context, backlog=backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
