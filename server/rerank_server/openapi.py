"""The OpenAPI 3.1 document of the REST shim, derived from the proto: routes from the
``google.api.http`` bindings, schemas from the message descriptors (protobuf's JSON
mapping), descriptions from the proto's comments, required fields from
``google.api.field_behavior``. On top, the limits the service enforces (``CONSTRAINTS``,
the served model names, --max-documents), so that a request valid by the document is one
the server accepts and the other way round. Served at GET /openapi.json, rendered at GET /docs."""
from __future__ import annotations

import copy
import html
from functools import lru_cache

from google.api import field_behavior_pb2
from google.protobuf import descriptor, descriptor_pb2

from rerank_server import __version__
from rerank_server.schema import SERVICE, descriptor_set, http_bindings, pb
from rerank_server.service import MAX_TOTAL_CHUNKS

F = descriptor.FieldDescriptor
INT32_MAX = 2**31 - 1
_SCALARS = {
    F.TYPE_STRING: {"type": "string"}, F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_DOUBLE: {"type": "number"}, F.TYPE_FLOAT: {"type": "number"},
    F.TYPE_INT32: {"type": "integer", "format": "int32", "minimum": -INT32_MAX - 1, "maximum": INT32_MAX},
    F.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    # protobuf's JSON mapping prints 64-bit integers as strings
    F.TYPE_INT64: {"type": "string", "format": "int64"}, F.TYPE_UINT64: {"type": "string", "format": "uint64"},
}
# gRPC's TimeoutValue: a positive integer of 1 to 8 digits (leading zeros allowed), then a unit;
# written without lookahead, as one alternative per count of leading zeros
GRPC_TIMEOUT_PATTERN = "^(" + "|".join(f"0{{{zeros}}}[1-9][0-9]{{0,{7 - zeros}}}" for zeros in range(8)) + ")[HMSmun]$"
TEXT_DOCUMENT = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}},
                 "description": 'an object with a string "text" (other fields are kept and echoed)'}
STRINGS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
# What RerankService.validate / validate_score enforce beyond the JSON types, per message and
# field; the served model names and --max-documents are filled in by openapi_document.
CONSTRAINTS = {
    "RerankRequest": {
        "query": {"minLength": 1}, "top_n": {"minimum": 1}, "max_tokens_per_doc": {"minimum": 1},
        "max_chunks_per_doc": {"minimum": 1, "maximum": MAX_TOTAL_CHUNKS},
        "documents": {"minItems": 1, "items": {"anyOf": [{"type": "string"}, {"type": "object"}]}},
    },
    "TeiRerankRequest": {
        "query": {"minLength": 1}, "texts": {"minItems": 1}, "top_n": {"minimum": 1},
        "truncation_direction": {"pattern": "^([Ll][Ee][Ff][Tt]|[Rr][Ii][Gg][Hh][Tt])$"},
    },
    "ScoreRequest": {
        "text_1": {"anyOf": [{"type": "string", "minLength": 1},
                             {**STRINGS, "items": {"type": "string", "minLength": 1}}]},
        "text_2": {"anyOf": [{"type": "string"}, STRINGS]},
    },
}
ERROR_SCHEMA = {
    "type": "object", "required": ["code", "message", "details"],
    "properties": {
        "code": {"type": "integer", "description": "gRPC status code"},
        "message": {"type": "string", "minLength": 1, "description": "what is wrong, naming the field"},
        "details": {"type": "array", "items": {}},
    },
}
TEI_ERROR_SCHEMA = {
    "type": "object", "required": ["error", "error_type"],
    "description": "the TEI dialect's error (POST /rerank with texts)",
    "properties": {"error": {"type": "string"},
                   "error_type": {"enum": ["empty", "validation", "tokenizer", "overloaded", "unhealthy", "backend"]}},
}


@lru_cache(maxsize=1)
def _comments() -> dict[str, str]:
    """Full name of each message, field and method -> its leading comment in the .proto."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set())
    out = {}
    for f in files.file:
        locations = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}
        for m, message in enumerate(f.message_type):
            out[f"{f.package}.{message.name}"] = locations.get((4, m), "")
            for i, field in enumerate(message.field):
                out[f"{f.package}.{message.name}.{field.name}"] = locations.get((4, m, 2, i), "")
        for s, service in enumerate(f.service):
            for i, method in enumerate(service.method):
                out[f"{f.package}.{service.name}.{method.name}"] = locations.get((6, s, 2, i), "")
    return out


def _describe(schema: dict, full_name: str) -> dict:
    text = " ".join(_comments().get(full_name, "").split())
    return {**schema, "description": text} if text else schema


def _field_schema(field: descriptor.FieldDescriptor, schemas: dict) -> dict:
    if field.type == F.TYPE_ENUM:  # protobuf's JSON mapping: the value's name, or its number (a known one)
        values = field.enum_type.values
        item = {"anyOf": [{"enum": [v.name for v in values]}, {"type": "integer", "enum": [v.number for v in values]}]}
    elif field.type == F.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Value":
            item = {"type": ["string", "object"]}  # a string, or an object such as {"text": ...}
        else:
            _message_schema(field.message_type, schemas)
            item = {"$ref": f"#/components/schemas/{field.message_type.name}"}
    else:
        item = dict(_SCALARS[field.type])
    if field.is_repeated:
        item = {"type": "array", "items": item}
    return _describe(item, field.full_name)


def _message_schema(message: descriptor.Descriptor, schemas: dict, constraints: dict | None = None) -> None:
    if message.name in schemas:
        return
    schemas[message.name] = {}  # placeholder against recursion
    properties, required = {}, []
    for field in message.fields:
        prop = _field_schema(field, schemas)
        description = prop.pop("description", None)
        extra = (constraints or {}).get(message.name, {}).get(field.name, {})
        if "anyOf" in extra:  # a narrower choice of types replaces the JSON mapping's
            prop.pop("type", None)
        prop.update(extra)
        behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if field_behavior_pb2.REQUIRED in behaviors:
            required.append(field.name)
        elif message.name.endswith("Request"):  # the shim reads a null field as absent
            prop = {"anyOf": [prop, {"type": "null"}]}
        properties[field.name] = {**prop, "description": description} if description else prop
    schemas[message.name] = _describe({"type": "object", "properties": properties, "required": required},
                                      message.full_name)


def _response_schema(message: descriptor.Descriptor, schemas: dict) -> None:
    """In responses every field without presence is printed (and so always there), and
    nothing else is."""
    schemas[message.name]["additionalProperties"] = False
    for field in message.fields:
        if field.type == F.TYPE_MESSAGE and field.message_type.full_name != "google.protobuf.Value":
            _response_schema(field.message_type, schemas)
        if not field.has_presence or field.is_repeated:
            if field.name not in schemas[message.name]["required"]:
                schemas[message.name]["required"].append(field.name)


def _constraints(model_names: tuple[str, ...], max_documents: int) -> dict:
    c = copy.deepcopy(CONSTRAINTS)
    for message, fields in (("RerankRequest", ["documents"]), ("TeiRerankRequest", ["texts"])):
        c[message]["model"] = {"enum": list(model_names)}
        for name in fields:
            c[message][name]["maxItems"] = max_documents
    c["ScoreRequest"]["model"] = {"enum": list(model_names)}
    for name in ("text_1", "text_2"):
        c["ScoreRequest"][name]["anyOf"][1]["maxItems"] = max_documents
    return c


def _rerank_request_rules(max_documents: int) -> list[dict]:
    """What validate() checks across fields, as JSON Schema: without rank_fields an object
    document needs a string "text"; documents x max_chunks_per_doc <= MAX_TOTAL_CHUNKS (one
    rule per step of MAX_TOTAL_CHUNKS // chunks below --max-documents)."""
    ranked = {"required": ["rank_fields"], "properties": {"rank_fields": {"type": "array", "minItems": 1}}}
    rules = [{"if": ranked, "else": {"properties": {"documents": {
        "items": {"anyOf": [{"type": "string"}, TEXT_DOCUMENT]}}}}}]
    previous = None
    for chunks in range(1, MAX_TOTAL_CHUNKS + 1):
        most = MAX_TOTAL_CHUNKS // chunks
        if most < max_documents and most != previous:
            rules.append({"if": {"required": ["max_chunks_per_doc"],
                                 "properties": {"max_chunks_per_doc": {"type": "integer", "minimum": chunks}}},
                          "then": {"properties": {"documents": {"maxItems": most}}}})
        previous = most
    return rules


def _score_request_rules(max_documents: int) -> list[dict]:
    """text_1 as a list of k > 1 strings pairs them with as many text_2 (one rule per k)."""
    return [{"if": {"required": ["text_1"], "properties": {"text_1": {"type": "array", "minItems": k, "maxItems": k}}},
             "then": {"properties": {"text_2": {"type": "array", "minItems": k, "maxItems": k}}}}
            for k in range(2, max_documents + 1)]


def _json(schema: dict, headers: dict | None = None, description: str = "OK") -> dict:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    return {**response, "headers": headers} if headers else response


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


@lru_cache(maxsize=4)
def openapi_document(model_names: tuple[str, ...] = (), max_documents: int = 1000,
                     takes_instruction: bool | None = None) -> dict:
    """``model_names``: the served id first, then its aliases; ``max_documents``: --max-documents;
    ``takes_instruction``: whether the served model takes ``instruction`` (an LLM reranker; None:
    not known yet, while the model loads), False removes it from the requests it may appear in."""
    constraints = _constraints(model_names, max_documents)
    schemas: dict = {"Error": ERROR_SCHEMA, "TeiError": TEI_ERROR_SCHEMA}
    for message in (pb.TeiRerankRequest.DESCRIPTOR, pb.TeiRank.DESCRIPTOR):
        _message_schema(message, schemas, constraints)
    _response_schema(pb.TeiRank.DESCRIPTOR, schemas)
    schemas["TeiRerankRequest"]["not"] = {"required": ["documents"]}
    schemas["TeiRerankResponse"] = {"type": "array", "items": _ref("TeiRank"),
                                    "description": "the TEI dialect's answer, sorted by score"}
    paths: dict = {}
    errors = {status: _json(_ref("Error"), description=meaning)
              for status, meaning in [("400", "invalid argument: the message names the field"),
                                      ("401", "missing or invalid API key"), ("404", "unknown model"),
                                      ("408", "request body not received within --http-body-timeout"),
                                      ("413", "body over the size limit, more tokens than --max-request-tokens, "
                                              "or a pair too long with truncate: false"),
                                      ("415", "Content-Type is not application/json (or missing)"),
                                      ("429", "queue full: retry later"), ("503", "model not serving yet"),
                                      ("504", "deadline exceeded"), ("500", "internal error")]}
    tei_errors = {status: _json({"anyOf": [_ref("Error"), _ref("TeiError")]}, description=response["description"])
                  for status, response in errors.items()}
    tei_errors.update({
        "422": _json(_ref("TeiError"), description="TEI dialect: a field of the wrong type or value"),
        "424": _json(_ref("TeiError"), description="TEI dialect: the model failed"),
    })
    headers = {"X-Request-Id": {"required": True, "schema": {"type": "string"},
                                "description": "the request's id (the one sent, or a new one)"},
               "X-Compute-Tokens": {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"},
                                    "description": "tokens fed to the model (usage.prompt_tokens)"},
               "X-Ignored-Fields": {"required": False, "schema": {"type": "string"},
                                    "description": "the body's unknown fields, which were ignored (comma-separated)"}}
    for verb, path, method in http_bindings():
        _message_schema(method.input_type, schemas, constraints)
        _message_schema(method.output_type, schemas, constraints)
        _response_schema(method.output_type, schemas)
        request_schema, ok = _ref(method.input_type.name), _ref(method.output_type.name)
        responses = errors
        if path == "/rerank":  # also the TEI dialect
            request_schema = {"oneOf": [request_schema, _ref("TeiRerankRequest")]}
            ok, responses = {"oneOf": [ok, _ref("TeiRerankResponse")]}, tei_errors
        paths.setdefault(path, {})[verb.lower()] = _describe({
            "operationId": f"{method.name}{path.replace('/', '_')}",
            "summary": f"{SERVICE.full_name}/{method.name}" + (" (or the TEI dialect)" if path == "/rerank" else ""),
            "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
            "responses": {"200": _json(ok, headers), **responses},
            "parameters": [
                {"name": "Grpc-Timeout", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": GRPC_TIMEOUT_PATTERN},
                 "description": "deadline, gRPC's format: a positive integer of 1 to 8 digits and a unit, H M S "
                                "(hours, minutes, seconds), m u n (milli-, micro-, nanoseconds), e.g. 500m; anything "
                                "else is a 400; counted once the body is validated; exceeded (as 1n always is): 504 "
                                "DEADLINE_EXCEEDED"},
                {"name": "X-Request-Id", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "echoed in the response header, its id and the log lines"},
            ],
            "security": [{}, {"bearer": []}],
        }, method.full_name)
    schemas["RerankRequest"]["allOf"] = _rerank_request_rules(max_documents)
    schemas["ScoreRequest"]["allOf"] = _score_request_rules(max_documents)
    if takes_instruction is False:  # a cross-encoder refuses it (400 naming the field)
        for name in ("RerankRequest", "ScoreRequest"):
            schemas[name]["allOf"].append({"not": {"required": ["instruction"]},
                                           "description": "the served model is a cross-encoder: no instruction"})
    schemas["RerankRequest"]["description"] = (
        f"At most {max_documents} documents (--max-documents), and documents x max_chunks_per_doc at most "
        f"{MAX_TOTAL_CHUNKS}. On POST /rerank a body with texts and no documents is the TEI dialect "
        "(TeiRerankRequest).")
    paths["/health"] = {"get": {"operationId": "health", "summary": "200 once the model is loaded and warmed, else 503",
                                "responses": {"200": {"description": "serving"},
                                              "503": {"description": "not serving"}}}}
    paths["/info"] = {"get": {"operationId": "info", "summary": "model, device, attention backend, limits, version",
                              "responses": {"200": _json({"type": "object"})}}}
    paths["/metrics"] = {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition format"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Rerank API", "version": __version__,
                 "description": "Scores every (query, document) pair with a cross-encoder and returns the "
                                "documents by relevance; POST /rerank also speaks text-embeddings-inference's "
                                "dialect, and /score, /v1/score vLLM's pair scoring. Derived from "
                                "proto/rerank/v1/rerank.proto."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def docs_page(spec: dict) -> str:
    """A self-contained HTML page (no external assets) describing every route and field."""
    e = html.escape
    schemas = spec["components"]["schemas"]

    def table(name: str) -> str:
        schema = schemas[name]
        rows = "".join(
            f"<tr><td><code>{e(field)}</code></td><td>{e(_type_name(prop))}</td>"
            f"<td>{'yes' if field in schema['required'] else ''}</td><td>{e(prop.get('description', ''))}</td></tr>"
            for field, prop in schema["properties"].items())
        return (f"<h3 id='{e(name)}'>{e(name)}</h3><p>{e(schema.get('description', ''))}</p>"
                f"<table><tr><th>field</th><th>type</th><th>required</th><th>meaning</th></tr>{rows}</table>")

    routes = "".join(f"<li><code>{verb.upper()} {e(path)}</code> — {e(op.get('summary', ''))}</li>"
                     for path, ops in spec["paths"].items() for verb, op in ops.items())
    tables = "".join(table(name) for name in schemas if "properties" in schemas[name])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(spec['info']['title'])}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;"
            "padding:.3em;vertical-align:top}table{border-collapse:collapse}</style></head><body>"
            f"<h1>{e(spec['info']['title'])} {e(spec['info']['version'])}</h1><p>{e(spec['info']['description'])}</p>"
            f"<h2>Routes</h2><ul>{routes}</ul><p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. "
            "Errors are <code>{\"code\", \"message\", \"details\"}</code> with the HTTP status mapped from the "
            f"gRPC code.</p><h2>Messages</h2>{tables}</body></html>")


def _type_name(prop: dict) -> str:
    if "anyOf" in prop:
        return " or ".join(_type_name(p) for p in prop["anyOf"])
    if "enum" in prop:
        return "one of " + ", ".join(map(str, prop["enum"]))
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if prop.get("type") == "array":
        return f"array of {_type_name(prop['items'])}"
    kind = prop.get("type", "any JSON")
    return " or ".join(kind) if isinstance(kind, list) else kind
