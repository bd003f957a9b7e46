"""The REST transport (``POST /v1/rerank``) over the standard library's urllib."""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import grpc
from google.protobuf import json_format

from rerank_client._proto import rerank_pb2 as pb
from rerank_client.client import RerankError


def post_rerank(url: str, request: pb.RerankRequest, *, api_key: str | None = None, timeout: float | None = 30.0,
                context: ssl.SSLContext | None = None, path: str = "/v1/rerank") -> dict[str, Any]:
    """POST ``request`` (its protobuf JSON mapping, as the server reads it) to ``url + path`` and
    return the JSON response. Raises :class:`RerankError` with the server's code and message.

    Example::

        body = post_rerank("http://localhost:8000", build_request("hi", ["hello", "bye"]))
        print(body["results"][0]["index"])
    """
    data = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    http_request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(http_request, timeout=timeout, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raw = e.read()
        request_id = e.headers.get("X-Request-Id")
        try:
            body = json.loads(raw)
            raise RerankError.from_code_number(int(body["code"]), str(body["message"]), request_id) from None
        except (ValueError, KeyError, TypeError):
            raise RerankError(grpc.StatusCode.UNKNOWN, f"HTTP {e.code}: {raw.decode(errors='replace')[:500]}",
                                               request_id) from None
    except urllib.error.URLError as e:  # refused, DNS, TLS, connect timeout
        code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(e.reason, TimeoutError) else grpc.StatusCode.UNAVAILABLE
        raise RerankError(code, f"{url}: {e.reason}") from None
    except TimeoutError as e:
        raise RerankError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{url}: {e}") from None
