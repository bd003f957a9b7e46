"""The OpenAPI 3.1 document of the REST shim, derived from the proto: routes from the
``google.api.http`` bindings, schemas from the message descriptors (protobuf's JSON
mapping), descriptions from the proto's comments, required fields from
``google.api.field_behavior``. Served at GET /openapi.json, rendered at GET /docs."""
from __future__ import annotations

import html
from functools import lru_cache

from google.api import field_behavior_pb2
from google.protobuf import descriptor, descriptor_pb2

from rerank_server import __version__
from rerank_server.schema import SERVICE, descriptor_set, http_bindings

F = descriptor.FieldDescriptor
_SCALARS = {
    F.TYPE_STRING: {"type": "string"}, F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_DOUBLE: {"type": "number"}, F.TYPE_FLOAT: {"type": "number"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    # protobuf's JSON mapping prints 64-bit integers as strings
    F.TYPE_INT64: {"type": "string", "format": "int64"}, F.TYPE_UINT64: {"type": "string", "format": "uint64"},
}
ERROR_SCHEMA = {
    "type": "object", "required": ["code", "message", "details"],
    "properties": {
        "code": {"type": "integer", "description": "gRPC status code"},
        "message": {"type": "string", "description": "what is wrong, naming the field"},
        "details": {"type": "array", "items": {}},
    },
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
    if field.type == F.TYPE_MESSAGE:
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


def _message_schema(message: descriptor.Descriptor, schemas: dict) -> None:
    if message.name in schemas:
        return
    schemas[message.name] = {}  # placeholder against recursion
    properties, required = {}, []
    for field in message.fields:
        properties[field.name] = _field_schema(field, schemas)
        behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if field_behavior_pb2.REQUIRED in behaviors:
            required.append(field.name)
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


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    schemas: dict = {"Error": ERROR_SCHEMA}
    paths: dict = {}
    errors = {status: {"description": meaning, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
              for status, meaning in [("400", "invalid argument: the message names the field"),
                                      ("401", "missing or invalid API key"), ("404", "unknown model"),
                                      ("413", "body over the size limit"), ("415", "Content-Type is not JSON"),
                                      ("429", "queue full: retry later"), ("503", "model not serving yet"),
                                      ("504", "deadline exceeded"), ("500", "internal error")]}
    for verb, path, method in http_bindings():
        _message_schema(method.input_type, schemas)
        _message_schema(method.output_type, schemas)
        _response_schema(method.output_type, schemas)
        paths.setdefault(path, {})[verb.lower()] = _describe({
            "operationId": f"{method.name}{path.replace('/', '_')}",
            "summary": f"{SERVICE.full_name}/{method.name}",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{method.input_type.name}"}}}},
            "responses": {"200": {"description": "OK", "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{method.output_type.name}"}}}}, **errors},
            "parameters": [
                {"name": "Grpc-Timeout", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "deadline, gRPC's format (e.g. 500m, 5S); exceeded: 504 DEADLINE_EXCEEDED"},
                {"name": "X-Request-Id", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "echoed in the response header, its id and the log lines"},
            ],
            "security": [{}, {"bearer": []}],
        }, method.full_name)
    paths["/health"] = {"get": {"operationId": "health", "summary": "200 once the model is loaded and warmed, else 503",
                                "responses": {"200": {"description": "serving"}, "503": {"description": "not serving"}}}}
    paths["/info"] = {"get": {"operationId": "info", "summary": "model, device, attention backend, limits, version",
                              "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    paths["/metrics"] = {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition format"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Rerank API", "version": __version__,
                 "description": "Scores every (query, document) pair with a cross-encoder and returns the "
                                "documents by relevance. Derived from proto/rerank/v1/rerank.proto."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def docs_page() -> str:
    """A self-contained HTML page (no external assets) describing every route and field."""
    spec, e = openapi_document(), html.escape
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
    tables = "".join(table(name) for name in schemas if name != "Error" and "properties" in schemas[name])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(spec['info']['title'])}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;"
            "padding:.3em;vertical-align:top}table{border-collapse:collapse}</style></head><body>"
            f"<h1>{e(spec['info']['title'])} {e(spec['info']['version'])}</h1><p>{e(spec['info']['description'])}</p>"
            f"<h2>Routes</h2><ul>{routes}</ul><p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. "
            "Errors are <code>{\"code\", \"message\", \"details\"}</code> with the HTTP status mapped from the "
            f"gRPC code.</p><h2>Messages</h2>{tables}</body></html>")


def _type_name(prop: dict) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if prop.get("type") == "array":
        return f"array of {_type_name(prop['items'])}"
    kind = prop.get("type", "any JSON")
    return " or ".join(kind) if isinstance(kind, list) else kind
