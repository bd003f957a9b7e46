"""grpc-gateway style REST shim: routes come from the proto's ``google.api.http``
annotations; JSON is transcoded with protobuf's JSON mapping (proto field names); errors
are ``{"code", "message", "details"}`` with the HTTP status mapped from the gRPC code.

Two things are the shim's own, because JSON can say what a proto message cannot:
- returned documents are echoed from the request's raw JSON (a google.protobuf.Value would
  turn the integer 7 into 7.0), and string documents become ``{"text": ...}`` where the
  dialect says so (/v2/rerank always; /v1/rerank and /rerank with --document-objects);
- POST /rerank with ``texts`` and no ``documents`` is the text-embeddings-inference (TEI)
  dialect: the body is read as a TeiRerankRequest, mapped onto a RerankRequest, and answered
  with TEI's bare array and TEI's errors.
"""
from __future__ import annotations

import json
import logging
import math
import time

import grpc
from aiohttp import web
from google.protobuf import descriptor, json_format, message_factory, struct_pb2

from rerank_server.openapi import docs_page, openapi_document
from rerank_server.schema import http_bindings, pb
from rerank_server.service import ApiError, Call, Deadline, RerankService, request_id_var

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


_TIMEOUT_UNITS = {"H": (3600.0, "h"), "M": (60.0, "min"), "S": (1.0, "s"), "m": (1e-3, "ms"),
                  "u": (1e-6, "µs"), "n": (1e-9, "ns")}


def _grpc_timeout(value: str | None) -> Deadline | None:
    """grpc-gateway's deadline header, gRPC's format: up to 8 digits and a unit (e.g. "500m")."""
    if value is None:
        return None
    if not (2 <= len(value) <= 9 and value[:-1].isascii() and value[:-1].isdigit() and value[-1] in _TIMEOUT_UNITS):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       "Grpc-Timeout must be up to 8 digits and a unit: H (hours), M (minutes), S (seconds), "
                       f"m (milliseconds), u (microseconds) or n (nanoseconds), e.g. 500m; got {value!r}")
    seconds, unit = _TIMEOUT_UNITS[value[-1]]
    return Deadline(int(value[:-1]) * seconds, f"{int(value[:-1])} {unit}")


# TEI's answer to each refusal: (HTTP status, error_type), as its router maps them.
_TEI_REASONS = {"empty": (400, "empty"), "too_many": (413, "validation"), "too_long": (413, "validation")}
_TEI_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "validation"), grpc.StatusCode.NOT_FOUND: (404, "validation"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "overloaded"), grpc.StatusCode.UNAVAILABLE: (503, "unhealthy"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "backend"), grpc.StatusCode.INTERNAL: (424, "backend"),
}


def tei_error_response(e: ApiError) -> web.Response:
    status, error_type = _TEI_REASONS.get(e.reason) or _TEI_CODES.get(e.code, (500, "backend"))
    response = web.json_response({"error": e.message, "error_type": error_type}, status=status)
    response[GRPC_CODE] = e.code
    return response


_INTEGER_TYPES = {descriptor.FieldDescriptor.CPPTYPE_INT32, descriptor.FieldDescriptor.CPPTYPE_UINT32,
                  descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64}


def _integral(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def parse_message(body: dict, message_class):
    """protobuf's JSON mapping, read strictly: it would also take an integer written as a
    string ("5"), an enum as any number (true, 2.5e-42), and it drops an unknown enum name
    (ignore_unknown_fields): the OpenAPI document (and every client) calls these errors."""
    for field in message_class.DESCRIPTOR.fields:
        value = body.get(field.name)
        if value is None or field.is_repeated:
            continue
        if field.cpp_type in _INTEGER_TYPES and not _integral(value):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field.name} must be an integer, got {value!r}")
        names = field.enum_type.values_by_name if field.enum_type else {}
        if field.enum_type and not (value in names if isinstance(value, str) else _integral(value)):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field.name} must be one of {', '.join(v.name for v in field.enum_type.values)}, "
                           f"got {value!r}")
    try:
        return json_format.ParseDict(body, message_class(), ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


def is_tei_body(path: str, body: dict) -> bool:
    """TEI callers post ``texts`` (and never ``documents``) to /rerank."""
    return path == "/rerank" and "texts" in body and "documents" not in body


def tei_to_rerank(body: dict, default_model: str) -> pb.RerankRequest:
    """A TEI body -> the RerankRequest that the one validation and scoring path takes."""
    tei = parse_message(body, pb.TeiRerankRequest)
    direction = tei.truncation_direction.lower() if tei.HasField("truncation_direction") else "right"
    if direction not in ("left", "right"):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"truncation_direction must be left or right (any case), got {tei.truncation_direction!r}")
    request = pb.RerankRequest(
        model=tei.model if tei.HasField("model") else default_model, query=tei.query,
        documents=[struct_pb2.Value(string_value=t) for t in tei.texts],
        return_documents=tei.return_text, raw_scores=tei.raw_scores,
        truncation_direction=pb.RerankRequest.LEFT if direction == "left" else pb.RerankRequest.RIGHT)
    for name in ("top_n", "truncate"):
        if tei.HasField(name):
            setattr(request, name, getattr(tei, name))
    return request


def _token_headers(tokens: int) -> dict[str, str]:
    return {"X-Compute-Tokens": str(tokens)}  # as TEI does; the timings are the X-*-Time headers


def echo_documents(reply: dict, sent: list, as_objects: bool) -> None:
    """Puts each returned document back as sent (raw JSON); strings as {"text": ...} when
    ``as_objects``."""
    for result in reply.get("results", ()):
        if "document" in result:
            document = sent[result["index"]]
            result["document"] = {"text": document} if as_objects and isinstance(document, str) else document


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


def build_app(service: RerankService, max_request_bytes: int, metrics_auth: bool = False,
              document_objects: bool = False) -> web.Application:
    """``document_objects``: /v1/rerank and /rerank return string documents as {"text": ...}
    too (/v2/rerank always does)."""
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
            if isinstance(e, web.HTTPMethodNotAllowed):
                response.headers["Allow"] = ", ".join(sorted(e.allowed_methods))
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
    handlers = {"Rerank": service.rerank, "Score": service.score}
    object_paths = {"/v2/rerank"} | ({"/v1/rerank", "/rerank"} if document_objects else set())

    def route(method_descriptor, path: str):
        call_service = handlers[method_descriptor.name]
        request_class = message_factory.GetMessageClass(method_descriptor.input_type)

        async def handle(request: web.Request) -> web.Response:
            if "Content-Type" in request.headers and not _is_json(request.content_type):
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Content-Type must be application/json, got {request.content_type!r}", 415)
            body = {k: v for k, v in _json_body(await request.read()).items() if v is not None}  # null: absent
            if is_tei_body(path, body):
                return await handle_tei(request, body)
            message = parse_message(body, request_class)
            deadline = _grpc_timeout(request.headers.get("Grpc-Timeout"))
            reply = json_format.MessageToDict(
                await call_service(message, request["call"], deadline),
                preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            if "documents" in body:
                echo_documents(reply, body["documents"], path in object_paths)
            return web.json_response(reply, headers=_token_headers(reply["usage"]["prompt_tokens"]))
        return handle

    async def handle_tei(request: web.Request, body: dict) -> web.Response:
        try:
            message = tei_to_rerank(body, service.model_id)
            reply = await service.rerank(message, request["call"], _grpc_timeout(request.headers.get("Grpc-Timeout")))
        except ApiError as e:
            return tei_error_response(e)
        ranks = [{"index": r.index, "score": r.relevance_score} for r in reply.results]
        if message.return_documents:
            for rank in ranks:
                rank["text"] = message.documents[rank["index"]].string_value
        headers = _token_headers(reply.usage.prompt_tokens)
        headers["X-Compute-Characters"] = str(len(message.query) * len(message.documents)
                                              + sum(len(d.string_value) for d in message.documents))
        return web.json_response(ranks, headers=headers)

    for verb, path, method in http_bindings():
        app.router.add_route(verb, path, route(method, path))

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
    names = (service.model_id, *sorted(service.served_names - {service.model_id}))
    spec = openapi_document(names, service.max_documents)
    page = docs_page(spec)

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(spec)

    async def docs(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
    return app
