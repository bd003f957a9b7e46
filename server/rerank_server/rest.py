"""grpc-gateway style REST shim: routes come from the proto's ``google.api.http``
annotations; JSON is transcoded with protobuf's JSON mapping (proto field names); errors
are ``{"code", "message", "details"}`` with the HTTP status mapped from the gRPC code.

The handlers are module-level functions over what ``build_app`` stores in the app (its
``web.AppKey``s); ``record`` (the middleware) opens and closes every request through the
service, as the gRPC servicer does. The HTTP and TEI statuses of the service's refusals are
this module's: the service raises a gRPC code and, where a dialect needs it, a ``Reason``.

What JSON can say and a proto message cannot is the shim's own:
- fields are type-checked before transcoding, so that every error names the field in plain
  words ("documents must be an array ...; got a string"), never in the protobuf parser's;
- unknown fields are accepted (clients send extras) and named: ``X-Ignored-Fields`` and one
  warning log line;
- returned documents are echoed from the request's raw JSON (a google.protobuf.Value would
  turn the integer 7 into 7.0), and string documents become ``{"text": ...}`` where the
  dialect says so (/v2/rerank always; /v1/rerank and /rerank with --document-objects);
- POST /rerank with ``texts`` and no ``documents`` is the text-embeddings-inference (TEI)
  dialect: the body is read as a TeiRerankRequest, mapped onto a RerankRequest, and answered
  with TEI's bare array and TEI's errors.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
import time

import grpc
from aiohttp import web
from google.protobuf import descriptor, json_format, message_factory, struct_pb2

from rerank_server.limits import GuardedHandler
from rerank_server.openapi import GRPC_TIMEOUT_PATTERN, docs_page, openapi_document
from rerank_server.schema import http_bindings, pb
from rerank_server.service import (
    ApiError,
    Deadline,
    Reason,
    RerankService,
    check_document_fields,
    check_rank_fields,
)

log = logging.getLogger(__name__)

# grpc-gateway's mapping of gRPC codes to HTTP statuses.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.FAILED_PRECONDITION: 400,
}
# where HTTP says more than the code: a pair too long to score untruncated is a payload too large
REASON_STATUS = {Reason.TOO_LONG: 413, Reason.TOO_LARGE: 413, Reason.MEDIA_TYPE: 415, Reason.BODY_TIMEOUT: 408}
# TEI's answer to each refusal: (HTTP status, error_type), as its router maps them.
TEI_REASONS = {Reason.EMPTY: (400, "empty"), Reason.TOO_MANY: (413, "validation"),
               Reason.TOO_LONG: (413, "validation"), Reason.TOO_LARGE: (413, "validation")}
TEI_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "validation"), grpc.StatusCode.NOT_FOUND: (404, "validation"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "overloaded"), grpc.StatusCode.UNAVAILABLE: (503, "unhealthy"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "backend"), grpc.StatusCode.INTERNAL: (424, "backend"),
}
# aiohttp's own refusals, expressed as gRPC codes for the error body.
_HTTP_TO_CODE = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
                 413: grpc.StatusCode.RESOURCE_EXHAUSTED}
_STATUS_TO_CODE = {status: code for code, status in reversed(HTTP_STATUS.items())}
# never behind the API key (/metrics: unless --metrics-auth)
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs"})
PROBE_PATHS = OPEN_PATHS | {"/info"}  # not requests: not counted, not logged

# What build_app stores in the app, for the handlers.
SERVICE = web.AppKey("service", RerankService)
UNGUARDED = web.AppKey("unguarded", frozenset)  # paths without the API key
OBJECT_PATHS = web.AppKey("object_paths", frozenset)  # routes answering string documents as {"text": ...}
METHODS = web.AppKey("methods", dict)  # path -> the RPC's method descriptor
SPEC = web.AppKey("spec", dict)  # takes_instruction (None: not known yet) -> the OpenAPI document
BODY_TIMEOUT = web.AppKey("body_timeout", float)  # seconds to receive a body
DOCS_PAGE = web.AppKey("docs_page", str)
# What a request carries from handler to middleware.
CALL = "call"
GRPC_CODE = "grpc_code"  # on a response: its gRPC status, for the metrics' `code` label
IGNORED = "ignored_fields"  # on a request: the body's unknown fields

SERVICE_CALLS = {"Rerank": RerankService.rerank, "Score": RerankService.score}


def error_response(code: grpc.StatusCode, message: str, status: int | None = None) -> web.Response:
    response = web.json_response({"code": code.value[0], "message": message, "details": []},
                                 status=status or HTTP_STATUS.get(code, 500))
    response[GRPC_CODE] = code
    return response


def api_error_response(e: ApiError) -> web.Response:
    return error_response(e.code, e.message, REASON_STATUS.get(e.reason))


def tei_error_response(e: ApiError) -> web.Response:
    status, error_type = TEI_REASONS.get(e.reason) or TEI_CODES.get(e.code, (500, "backend"))
    response = web.json_response({"error": e.message, "error_type": error_type}, status=status)
    response[GRPC_CODE] = e.code
    return response


# ---------------------------------------------------------------- headers

# the published pattern (1 to 8 digits, positive, a unit), for fullmatch: Python's $ would let a "\n" follow
_GRPC_TIMEOUT = re.compile(GRPC_TIMEOUT_PATTERN.removeprefix("^").removesuffix("$"))
_TIMEOUT_UNITS = {"H": (3600.0, "h"), "M": (60.0, "min"), "S": (1.0, "s"), "m": (1e-3, "ms"),
                  "u": (1e-6, "µs"), "n": (1e-9, "ns")}


def grpc_timeout(value: str | None) -> Deadline | None:
    """grpc-gateway's deadline header in gRPC's wire format (TimeoutValue): a positive integer of
    1 to 8 digits and a unit, e.g. "500m"; anything else (0, 9 digits, another unit) is refused."""
    if value is None:
        return None
    if not _GRPC_TIMEOUT.fullmatch(value):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       "Grpc-Timeout must be a positive integer of 1 to 8 digits and a unit: H (hours), M (minutes), "
                       f"S (seconds), m (milliseconds), u (microseconds) or n (nanoseconds), e.g. 500m; got {value!r}")
    seconds, unit = _TIMEOUT_UNITS[value[-1]]
    return Deadline(int(value[:-1]) * seconds, f"{int(value[:-1])} {unit}")


def _token_headers(tokens: int) -> dict[str, str]:
    return {"X-Compute-Tokens": str(tokens)}  # as TEI does; the timings are the X-*-Time headers


def _ignored_header(names: list[str]) -> str:
    """The unknown fields' names for X-Ignored-Fields: escaped to printable ASCII, bounded."""
    return ", ".join(ascii(name)[1:-1] for name in names)[:1000]


# ---------------------------------------------------------------- JSON -> proto

F = descriptor.FieldDescriptor
_INTEGER_RANGES = {F.CPPTYPE_INT32: (-2**31, 2**31 - 1), F.CPPTYPE_UINT32: (0, 2**32 - 1),
                   F.CPPTYPE_INT64: (-2**63, 2**63 - 1), F.CPPTYPE_UINT64: (0, 2**64 - 1)}
# What a google.protobuf.Value field may hold, in the words of its error message.
_VALUE_SHAPES = {"documents": 'an array of strings or of objects with a "text" field',
                 "text_1": "a string or an array of strings", "text_2": "a string or an array of strings"}
MAX_NESTING = 64  # arrays and objects inside a field (protobuf's parser stops at 100)


def json_kind(value) -> str:
    """A JSON value's type in words: "a string", "a number", "an array", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}[type(value)]


def _integral(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _field_error(field: descriptor.FieldDescriptor, value) -> str | None:
    """What is wrong with a (non-null) JSON value for ``field``, in plain words; None if nothing."""
    name = field.name
    if field.message_type is not None:  # google.protobuf.Value: its items are the service's to check
        shape = _VALUE_SHAPES.get(name, "an array" if field.is_repeated else "a JSON value")
        if field.is_repeated:
            fits = isinstance(value, list)
        else:  # text_1, text_2: the service checks the array's items
            fits = isinstance(value, (str, list)) or name not in _VALUE_SHAPES
        return None if fits else f"{name} must be {shape}; got {json_kind(value)}"
    if field.is_repeated:  # repeated strings
        if not isinstance(value, list):
            return f"{name} must be an array of strings; got {json_kind(value)}"
        wrong = next((i for i, item in enumerate(value) if not isinstance(item, str)), None)
        return None if wrong is None else f"{name}[{wrong}] must be a string; got {json_kind(value[wrong])}"
    if field.enum_type is not None:  # protobuf's JSON mapping: the value's name, or its number
        names = [v.name for v in field.enum_type.values]
        numbers = [v.number for v in field.enum_type.values]
        if isinstance(value, str) and value in names or _integral(value) and value in numbers:
            return None
        scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        got = repr(value) if scalar else json_kind(value)
        return f"{name} must be one of {', '.join(names)}; got {got}"
    if field.cpp_type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[field.cpp_type]
        if not _integral(value):
            return f"{name} must be an integer; got {value!r}" if isinstance(value, float) else \
                f"{name} must be an integer; got {json_kind(value)}"
        return None if low <= value <= high else f"{name} must be an integer from {low} to {high}; got {value}"
    if field.cpp_type == F.CPPTYPE_BOOL:
        return None if isinstance(value, bool) else f"{name} must be true or false; got {json_kind(value)}"
    if field.cpp_type == F.CPPTYPE_STRING:
        return None if isinstance(value, str) else f"{name} must be a string; got {json_kind(value)}"
    if field.cpp_type in (F.CPPTYPE_DOUBLE, F.CPPTYPE_FLOAT):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{name} must be a number; got {json_kind(value)}"
    return None


def _text_error(name: str, value, depth: int = 0) -> str | None:
    """Text protobuf cannot carry (a lone surrogate: no UTF-8), an integer beyond a double's
    range, or nesting beyond MAX_NESTING, anywhere in a field's value (object keys included)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"{name} holds text that is not valid Unicode (a lone surrogate such as \\ud800)"
        return None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        return f"{name} holds an integer too large for a JSON number the API can carry (at most about 1.8e308)"
    if isinstance(value, (list, dict)):
        if depth == MAX_NESTING:
            return f"{name} nests arrays and objects more than {MAX_NESTING} levels deep"
        items = [*value, *value.values()] if isinstance(value, dict) else value
        return next((e for e in (_text_error(name, item, depth + 1) for item in items) if e), None)
    return None


def known_fields(message_class) -> dict[str, descriptor.FieldDescriptor]:
    """JSON name -> field: protobuf's JSON mapping takes the proto name and the lowerCamelCase one."""
    fields = message_class.DESCRIPTOR.fields
    return {**{f.json_name: f for f in fields}, **{f.name: f for f in fields}}


def parse_message(body: dict, message_class):
    """protobuf's JSON mapping of ``body`` (nulls already dropped: absent), each field checked
    first, so that a wrong type is an ApiError naming the field in plain words; the parser
    would also take an integer written as a string ("5") or a boolean as an enum. Unknown
    fields are skipped (see ``unknown_fields``)."""
    fields = known_fields(message_class)
    message, seen = message_class(), set()
    for key, value in body.items():
        field = fields.get(key)
        if field is None:
            continue
        if field.name in seen:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field.name} is given twice (as {field.name} and {field.json_name})")
        seen.add(field.name)
        error = _field_error(field, value) or _text_error(field.name, value)
        if error is None:
            try:
                message.MergeFrom(json_format.ParseDict({key: value}, message_class()))
            except json_format.ParseError:  # what the checks above do not foresee; never the parser's text
                error = f"{field.name} cannot be read as the type the API declares for it"
        if error is not None:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, error)
    return message


def unknown_fields(body: dict, message_class) -> list[str]:
    fields = known_fields(message_class)
    return [key for key in body if key not in fields]


def is_tei_body(path: str, body: dict) -> bool:
    """TEI callers post ``texts`` (and never ``documents``) to /rerank."""
    return path == "/rerank" and "texts" in body and body.get("documents") is None


def tei_to_rerank(tei: pb.TeiRerankRequest, default_model: str) -> pb.RerankRequest:
    """A TEI request -> the RerankRequest that the one validation and scoring path takes."""
    direction = tei.truncation_direction.lower() if tei.HasField("truncation_direction") else "right"
    if direction not in ("left", "right"):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"truncation_direction must be left or right (any case); got {tei.truncation_direction!r}")
    request = pb.RerankRequest(
        model=tei.model if tei.HasField("model") else default_model, query=tei.query,
        documents=[struct_pb2.Value(string_value=t) for t in tei.texts],
        return_documents=tei.return_text, raw_scores=tei.raw_scores,
        truncation_direction=pb.RerankRequest.LEFT if direction == "left" else pb.RerankRequest.RIGHT)
    for name in ("top_n", "truncate"):
        if tei.HasField(name):
            setattr(request, name, getattr(tei, name))
    return request


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


def check_sizes(body: dict, service: RerankService) -> None:
    """The counts the service bounds, checked on the raw JSON before any per-item work (type
    checks, transcoding): the documents (under any dialect's name), rank_fields, and the fields
    of each document object."""
    for name in ("documents", "texts", "text_1", "text_2"):
        if isinstance(body.get(name), list):
            service.check_not_too_many(name, len(body[name]))
    if isinstance(body.get("rank_fields"), list):
        check_rank_fields(len(body["rank_fields"]))
    if isinstance(body.get("documents"), list):
        for index, document in enumerate(body["documents"]):
            if isinstance(document, dict):
                check_document_fields(index, len(document))


def read_message(body: dict, message_class, service: RerankService):
    """``body`` as ``message_class`` (nulls are absent), sizes checked first. -> (the message, the
    names of its unknown fields). CPU work: run off the event loop."""
    check_sizes(body, service)
    message = parse_message({k: v for k, v in body.items() if v is not None}, message_class)
    return message, unknown_fields(body, message_class)


async def _read_message(request: web.Request, body: dict, message_class):
    """``read_message`` off the loop; the unknown fields noted for the middleware."""
    message, ignored = await request.app[SERVICE].off_loop(read_message, body, message_class, request.app[SERVICE])
    if ignored:
        request[IGNORED] = ignored
        log.warning("ignored unknown fields: %s", _ignored_header(ignored))
    return message


async def read_json(request: web.Request) -> dict:
    """The body, within --http-body-timeout and --max-request-bytes, as a JSON object (parsed
    off the event loop). Only ``application/json`` (or ``+json``) is taken: a cross-site form
    cannot send that type without a preflight."""
    if "Content-Type" not in request.headers or not _is_json(request.content_type):
        got = f"got {request.content_type!r}" if "Content-Type" in request.headers else "none was sent"
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"Content-Type must be application/json; {got}", Reason.MEDIA_TYPE)
    timeout = request.app[BODY_TIMEOUT]
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, f"request body: not received within {timeout:g} s "
                       "(--http-body-timeout)", Reason.BODY_TIMEOUT) from None
    return await request.app[SERVICE].off_loop(_json_body, raw)


# ---------------------------------------------------------------- handlers

@web.middleware
async def record(request: web.Request, handler) -> web.StreamResponse:
    """Every request's bookkeeping: its id, the API key, errors as the grpc-gateway body, the
    timing headers, and (through the service, as on gRPC) its metrics and log line."""
    service = request.app[SERVICE]
    call = request[CALL] = service.begin(request.headers.get("X-Request-Id"))
    connection = request.protocol if isinstance(request.protocol, GuardedHandler) else None
    if connection:
        connection.serving = True  # not to be evicted for a new connection (rerank_server.limits)
    try:
        return await _record(request, handler, service, call)
    finally:
        if connection:
            connection.serving, connection.waiting_since = False, time.monotonic()


async def _record(request: web.Request, handler, service: RerankService, call) -> web.StreamResponse:
    try:
        if request.path not in request.app[UNGUARDED]:
            service.authenticate(request.headers.get("Authorization"), "http")  # before the body is read
        response = await handler(request)
    except ApiError as e:
        response = api_error_response(e)
        if e.code == grpc.StatusCode.UNAUTHENTICATED or e.reason == Reason.BODY_TIMEOUT:
            response.force_close()  # the body was not read (or not all of it): this connection ends
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
    for stage, milliseconds in call.stage_milliseconds().items():
        response.headers[f"X-{stage.capitalize()}-Time"] = milliseconds
    if IGNORED in request:
        response.headers["X-Ignored-Fields"] = _ignored_header(request[IGNORED])
    if service.draining:
        response.force_close()  # keep-alive clients reconnect, to another replica
    if request.path not in PROBE_PATHS:
        resource = request.match_info.route.resource
        code = response.get(GRPC_CODE) or (grpc.StatusCode.OK if response.status < 400 else
                                           _STATUS_TO_CODE.get(response.status, grpc.StatusCode.UNKNOWN))
        service.end(call, "http", resource.canonical if resource else "unmatched", code,
                    f"{request.method} {request.path} {response.status}", response.status)
    return response


async def transcode(request: web.Request) -> web.Response:
    """Any ``google.api.http`` binding: JSON -> the RPC's request -> the service -> JSON."""
    path = request.match_info.route.resource.canonical
    body = await read_json(request)
    if is_tei_body(path, body):
        return await tei_rerank(request, body)
    method = request.app[METHODS][path]
    message = await _read_message(request, body, message_factory.GetMessageClass(method.input_type))
    service = request.app[SERVICE]
    reply = await SERVICE_CALLS[method.name](service, message, request[CALL],
                                             grpc_timeout(request.headers.get("Grpc-Timeout")))
    answer = json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    if body.get("documents") is not None:
        echo_documents(answer, body["documents"], path in request.app[OBJECT_PATHS])
    return web.json_response(answer, headers=_token_headers(reply.usage.prompt_tokens))


async def tei_rerank(request: web.Request, body: dict) -> web.Response:
    """POST /rerank in text-embeddings-inference's dialect: its bare array, its errors."""
    service = request.app[SERVICE]
    try:
        message = tei_to_rerank(await _read_message(request, body, pb.TeiRerankRequest), service.model_id)
        reply = await service.rerank(message, request[CALL], grpc_timeout(request.headers.get("Grpc-Timeout")),
                                     documents_field="texts")
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


async def health(request: web.Request) -> web.Response:
    if request.app[SERVICE].ready:
        return web.json_response({"status": "SERVING"})
    return web.json_response({"status": "NOT_SERVING"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.metrics.queued_tokens.set(service.scheduler.queued_tokens if service.scheduler else 0)
    service.metrics.pending_tokens.set(service.scheduler.pending_tokens if service.scheduler else 0)
    service.metrics.requests_in_flight.set(service.in_flight)
    return web.Response(body=service.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


async def info(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].describe())


async def openapi(request: web.Request) -> web.Response:
    """The document for what is served: once the model is loaded, whether it takes ``instruction``."""
    service, specs = request.app[SERVICE], request.app[SPEC]
    takes = service.takes_instruction
    if takes not in specs:
        names = (service.model_id, *sorted(service.served_names - {service.model_id}))
        specs[takes] = openapi_document(names, service.max_documents, takes_instruction=takes)
    return web.json_response(specs[takes])


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=request.app[DOCS_PAGE], content_type="text/html")


def build_app(service: RerankService, max_request_bytes: int, metrics_auth: bool = False,
              document_objects: bool = False, body_timeout: float = 30.0) -> web.Application:
    """``document_objects``: /v1/rerank and /rerank return string documents as {"text": ...}
    too (/v2/rerank always does). ``body_timeout``: seconds to receive a request body (408 after)."""
    app = web.Application(client_max_size=max_request_bytes, middlewares=[record])
    app[SERVICE] = service
    app[BODY_TIMEOUT] = body_timeout
    app[UNGUARDED] = OPEN_PATHS - ({"/metrics"} if metrics_auth else set())
    app[OBJECT_PATHS] = frozenset({"/v2/rerank"} | ({"/v1/rerank", "/rerank"} if document_objects else set()))
    app[METHODS] = {}
    for verb, path, method in http_bindings():
        app[METHODS][path] = method
        app.router.add_route(verb, path, transcode)
    names = (service.model_id, *sorted(service.served_names - {service.model_id}))
    app[SPEC] = {None: openapi_document(names, service.max_documents)}  # by takes_instruction, built on use
    app[DOCS_PAGE] = docs_page(app[SPEC][None])
    for path, handler in (("/health", health), ("/metrics", metrics), ("/info", info), ("/openapi.json", openapi),
                          ("/docs", docs)):
        app.router.add_get(path, handler)
    return app
