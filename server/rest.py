"""grpc-gateway style REST shim: routes come from the proto's ``google.api.http``
annotations; JSON is transcoded with protobuf's JSON mapping (proto field names); errors
are ``{"code", "message", "details"}`` with the HTTP status mapped from the gRPC code."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import grpc
from aiohttp import web
from google.protobuf import json_format, message_factory

from rerank_server.openapi import docs_page, openapi_document
from rerank_server.schema import http_bindings
from rerank_server.service import ApiError, Call, RerankService, request_id_var

log = logging.getLogger(__name__)

# grpc-gateway's mapping of gRPC codes to HTTP statuses.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.FAILED_PRECONDITION: 400,
}
# aiohttp's own refusals, expressed as gRPC codes for the error body.
_HTTP_TO_CODE = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
                 413: grpc.StatusCode.RESOURCE_EXHAUSTED}
# never behind the API key (/metrics: unless --metrics-auth)
OPEN_PATHS = {"/health", "/metrics", "/openapi.json", "/docs"}
PROBE_PATHS = OPEN_PATHS | {"/info"}


def error_response(code: grpc.StatusCode, message: str, status: int | None = None) -> web.Response:
    response = web.json_response({"code": code.value[0], "message": message, "details": []},
                                 status=status or HTTP_STATUS.get(code, 500))
    response[GRPC_CODE] = code
    return response


GRPC_CODE = "grpc_code"  # the response's gRPC status, for the metrics' `code` label
_STATUS_TO_CODE = {status: code for code, status in reversed(HTTP_STATUS.items())}


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _grpc_timeout(value: str | None) -> float | None:
    """grpc-gateway's deadline header, gRPC's format: up to 8 digits and a unit (e.g. "500m")."""
    if value is None:
        return None
    if not (2 <= len(value) <= 9 and value[:-1].isdigit() and value[-1] in _TIMEOUT_UNITS):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"Grpc-Timeout must be up to 8 digits and a unit of H, M, S, m, u or n (e.g. 500m), got {value!r}")
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _json_body(raw: bytes) -> dict:
    """Strict JSON: no NaN/Infinity and no overflowing numbers (they could not be echoed back)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "request body must be a JSON object")
    return body


def build_app(service: RerankService, max_request_bytes: int, metrics_auth: bool = False) -> web.Application:
    open_paths = OPEN_PATHS - ({"/metrics"} if metrics_auth else set())

    @web.middleware
    async def middleware(request: web.Request, handler):
        call = Call(request_id=request.headers.get("X-Request-Id") or Call().request_id)
        request["call"] = call
        request_id_var.set(call.request_id)
        try:
            if request.path not in open_paths:
                service.authenticate(request.headers.get("Authorization"))
            response = await handler(request)
        except ApiError as e:
            response = error_response(e.code, e.message, e.http_status)
        except web.HTTPRequestEntityTooLarge:
            response = error_response(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"request body is larger than the limit of {request.client_max_size} bytes "
                                      "(--max-request-bytes)", 413)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = _HTTP_TO_CODE.get(e.status, grpc.StatusCode.INVALID_ARGUMENT)
            response = error_response(code, f"{request.method} {request.path}: {e.reason}", e.status)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = error_response(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        response.headers["X-Request-Id"] = call.request_id
        for stage, seconds in call.timings.items():
            response.headers[f"X-{stage.capitalize()}-Time"] = f"{seconds * 1000:.2f}"  # milliseconds
        if service.draining:
            response.force_close()  # keep-alive clients reconnect, to another replica
        if request.path not in PROBE_PATHS:  # health, metrics, docs and info probes are no requests
            route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
            code = response.get(GRPC_CODE) or (grpc.StatusCode.OK if response.status < 400 else
                                               _STATUS_TO_CODE.get(response.status, grpc.StatusCode.UNKNOWN))
            service.metrics.requests.labels("http", route, code.name, str(response.status)).inc()
            elapsed = time.perf_counter() - call.started
            service.metrics.request_seconds.labels("http").observe(elapsed)
            log.info("%s %s %d in %.1f ms", request.method, request.path, response.status, elapsed * 1000)
        return response

    app = web.Application(client_max_size=max_request_bytes, middlewares=[middleware])
    handlers = {"Rerank": service.rerank}

    def route(method_descriptor):
        call_service = handlers[method_descriptor.name]
        request_class = message_factory.GetMessageClass(method_descriptor.input_type)

        async def handle(request: web.Request) -> web.Response:
            if "Content-Type" in request.headers and not _is_json(request.content_type):
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Content-Type must be application/json, got {request.content_type!r}", 415)
            body = {k: v for k, v in _json_body(await request.read()).items() if v is not None}  # null: absent
            try:
                message = json_format.ParseDict(body, request_class(), ignore_unknown_fields=True)
            except json_format.ParseError as e:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            timeout = _grpc_timeout(request.headers.get("Grpc-Timeout"))
            try:
                reply = await asyncio.wait_for(call_service(message, request["call"]), timeout)
            except asyncio.TimeoutError:  # the scoring task was cancelled: its queued pairs are dropped
                raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"deadline exceeded: the request took longer than its Grpc-Timeout "
                               f"({request.headers['Grpc-Timeout']})") from None
            return web.json_response(json_format.MessageToDict(
                reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
        return handle

    for verb, path, method in http_bindings():
        app.router.add_route(verb, path, route(method))

    async def health(_: web.Request) -> web.Response:
        if service.ready:
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        service.metrics.queued_tokens.set(service.scheduler.queued_tokens if service.scheduler else 0)
        return web.Response(body=service.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def show_info(_: web.Request) -> web.Response:
        return web.json_response(service.describe())

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/info", show_info)
    app.router.add_get("/openapi.json", lambda _: web.json_response(openapi_document()))
    app.router.add_get("/docs", lambda _: web.Response(text=docs_page(), content_type="text/html"))
    return app
