"""The gRPC transport: the Rerank servicer (Rerank, Score), grpc.health.v1 and server reflection.

The API key is checked by an interceptor from the call's metadata, before the request message
is read: a refused call never costs the memory of its message. Errors are answered by setting
the status, not by ``context.abort`` (whose exception would keep the call, and its request,
alive until the next cycle collection)."""
from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rerank_server.limits import ConnectionLimits
from rerank_server.schema import SERVICE, pb, pb_grpc
from rerank_server.service import ApiError, RerankService

log = logging.getLogger(__name__)


class RerankServicer(pb_grpc.RerankServicer):
    def __init__(self, service: RerankService):
        self.service = service

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        return await self._serve("Rerank", self.service.rerank, request, context)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await self._serve("Score", self.service.score, request, context)

    async def _serve(self, name: str, method, request, context: grpc.aio.ServicerContext):
        metadata = dict(context.invocation_metadata() or ())
        call = self.service.begin(metadata.get("x-request-id"))
        code, error, response = grpc.StatusCode.CANCELLED, None, None  # stays CANCELLED if the caller goes away
        try:
            response = await method(request, call)
            code = grpc.StatusCode.OK
        except ApiError as e:
            code, error = e.code, e.message
        except Exception:  # a bug, not the caller's fault: INTERNAL, logged, the server goes on
            log.exception("unhandled error in %s", name)
            code, error = grpc.StatusCode.INTERNAL, "internal error; see the server log"
        finally:
            context.set_trailing_metadata([("x-request-id", call.request_id)] + [
                (f"x-{stage}-time", milliseconds) for stage, milliseconds in call.stage_milliseconds().items()])
            self.service.end(call, "grpc", name, code, f"gRPC {name} {code.name}")
        if error is not None:
            context.set_code(code)
            context.set_details(error)
        return response


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call to the Rerank service without a valid API key before its message is read
    (health and reflection stay open, as on REST)."""

    def __init__(self, service: RerankService):
        self.service = service
        self.guarded = f"/{SERVICE.full_name}/"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if not self.service.auth_required or not details.method.startswith(self.guarded):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        call = self.service.begin(metadata.get("x-request-id"))
        try:
            self.service.authenticate(metadata.get("authorization"), "grpc")
        except ApiError as e:
            name = details.method.rsplit("/", 1)[-1]
            self.service.end(call, "grpc", name, e.code, f"gRPC {name} {e.code.name}")
            return _refusal(e, call.request_id)
        return await continuation(details)


def _refusal(error: ApiError, request_id: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``error`` without reading the request: as stream-unary, the
    message is never received (a unary call's single message is the stream's first)."""
    async def refuse(requests, context: grpc.aio.ServicerContext):
        context.set_trailing_metadata([("x-request-id", request_id)])
        context.set_code(error.code)
        context.set_details(error.message)
    return grpc.stream_unary_rpc_method_handler(refuse)


# Scale-out (issue 23). Keepalive matching rerank_client's (a ping every 20 s, also on idle
# connections): pings up to twice that often are allowed, more frequent ones get GOAWAY
# "too_many_pings"; the server's own pings find clients that vanished without closing.
KEEPALIVE_OPTIONS = (("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.min_ping_interval_without_data_ms", 10_000))


def connection_options(max_age: float, grace: float) -> list[tuple[str, int]]:
    """Keepalive, and a connection lifetime: ``max_age`` seconds (gRPC adds +-10% jitter; 0: no
    limit) after which the server sends GOAWAY and the client reconnects, re-resolving its target
    (a headless Service's DNS name), so that long-lived clients spread onto new replicas; calls
    in flight then get ``grace`` more seconds."""
    options = list(KEEPALIVE_OPTIONS)
    if max_age > 0:
        options += [("grpc.max_connection_age_ms", int(max_age * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(grace * 1000))]
    return options


def build_grpc_server(service: RerankService, address: str, max_message_bytes: int,
                      credentials: grpc.ServerCredentials | None = None, limits: ConnectionLimits | None = None,
                      extra_options: list[tuple[str, int]] | tuple = ()):
    """-> (server, health servicer). Health starts NOT_SERVING; the caller flips it.
    ``extra_options``: more gRPC server options (see :func:`connection_options`)."""
    limits = limits or ConnectionLimits()
    server = grpc.aio.server(interceptors=[AuthInterceptor(service)], options=[
        # gRPC turns SO_REUSEPORT on by default: a second server on the same port would then
        # share it, calls alternating between two processes. Off: a busy port is an error.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # a connection that has not finished its HTTP/2 (and TLS) handshake in time is dropped,
        # and one with no call for the idle timeout is closed (GOAWAY), as REST's idle sockets are
        ("grpc.server_handshake_timeout_ms", int(limits.header_timeout * 1000)),
        ("grpc.max_connection_idle_ms", int(limits.grpc_idle_timeout * 1000)),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        *extra_options,
    ])
    pb_grpc.add_RerankServicer_to_server(RerankServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return server, health_servicer


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE.full_name):
        await health_servicer.set(name, status)
