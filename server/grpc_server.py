"""The gRPC transport: the Rerank servicer, grpc.health.v1 and server reflection."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.schema import SERVICE, pb, pb_grpc
from server.service import ApiError, RerankService


class RerankServicer(pb_grpc.RerankServicer):
    def __init__(self, service: RerankService):
        self.service = service

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        try:
            return await self.service.rerank(request)
        except ApiError as e:
            await context.abort(e.code, e.message)


def build_grpc_server(service: RerankService, address: str, max_message_bytes: int):
    """-> (server, health servicer). Health starts NOT_SERVING; the caller flips it."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    pb_grpc.add_RerankServicer_to_server(RerankServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return server, health_servicer


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE.full_name):
        await health_servicer.set(name, status)
