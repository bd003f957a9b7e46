"""The REST transport (``POST /v1/rerank``) over the standard library's urllib, with failover
over several addresses."""
from __future__ import annotations

import itertools
import json
import random
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from rerank_client._proto import rerank_pb2 as pb
from rerank_client.client import MAX_RETRIES, RerankError

_next_start = itertools.count(random.randrange(1 << 16))  # rotates the first address tried, per process


def split_urls(url: str | Sequence[str]) -> list[str]:
    """``"http://a:8000,http://b:8000"`` or a list -> the list of base URLs."""
    urls = [u.strip() for u in (url.split(",") if isinstance(url, str) else url) if u.strip()]
    if not urls:
        raise ValueError("no URL given")
    return urls


def post_rerank(url: str | Sequence[str], request: pb.RerankRequest, *, api_key: str | None = None,
                timeout: float | None = 30.0, context: ssl.SSLContext | None = None, path: str = "/v1/rerank",
                max_retries: int = MAX_RETRIES, initial_backoff: float = 0.1,
                max_backoff: float = 5.0) -> dict[str, Any]:
    """POST ``request`` (its protobuf JSON mapping, as the server reads it) to ``url + path`` and
    return the JSON response. Raises :class:`RerankError` with the server's code and message.

    ``url``: one base URL, or several (a list or comma-separated) of replicas. Each call starts at
    the next one; an attempt that fails as gRPC's UNAVAILABLE would (a refused or reset
    connection, HTTP 503: the replica is down, loading or draining; reranking is idempotent) is
    retried on the next address, up to ``max_retries`` times, after the same backoff as the gRPC
    client's retry policy (a random wait up to ``initial_backoff``, the bound doubling up to
    ``max_backoff``), never past ``timeout`` in all. Nothing else is retried.

    Example::

        body = post_rerank("http://localhost:8000", build_request("hi", ["hello", "bye"]))
        print(body["results"][0]["index"])
    """
    urls = split_urls(url)
    data = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = None if timeout is None else time.monotonic() + timeout
    first = next(_next_start)
    bound = initial_backoff
    for attempt in itertools.count():
        base = urls[(first + attempt) % len(urls)]
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise RerankError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{base}: no answer within {timeout:g} s")
        try:
            return _post_once(base.rstrip("/") + path, data, headers, remaining, context)
        except RerankError as e:
            if e.code != grpc.StatusCode.UNAVAILABLE or attempt >= max_retries:
                raise
            delay = random.uniform(0, bound)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise
            time.sleep(delay)
            bound = min(bound * 2, max_backoff)
    raise AssertionError("unreachable")


def _post_once(url: str, data: bytes, headers: dict[str, str], timeout: float | None,
               context: ssl.SSLContext | None) -> dict[str, Any]:
    http_request = urllib.request.Request(url, data=data, headers=headers, method="POST")
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
            code = grpc.StatusCode.UNAVAILABLE if e.code == 503 else grpc.StatusCode.UNKNOWN
            raise RerankError(code, f"HTTP {e.code}: {raw.decode(errors='replace')[:500]}", request_id) from None
    except urllib.error.URLError as e:  # refused, DNS, TLS, connect timeout
        code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(e.reason, TimeoutError) else grpc.StatusCode.UNAVAILABLE
        raise RerankError(code, f"{url}: {e.reason}") from None
    except ConnectionError as e:  # reset, or closed before the reply (http.client.RemoteDisconnected)
        raise RerankError(grpc.StatusCode.UNAVAILABLE, f"{url}: {e}") from None
    except TimeoutError as e:
        raise RerankError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{url}: {e}") from None
