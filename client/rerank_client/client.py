"""Typed gRPC clients for ``rerank.v1.Rerank``: :class:`RerankClient` (blocking) and
:class:`AsyncRerankClient` (``grpc.aio``), with deadlines, API keys and TLS. A target may name
several servers (``dns:///reranker-headless:50051``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``):
calls are balanced over them by gRPC itself (``round_robin``, skipping replicas whose
``grpc.health.v1`` status is not SERVING) and a call that fails with UNAVAILABLE is retried,
on another replica, by gRPC's retry policy (bounded, exponential backoff with jitter, within
the call's deadline). Both are set through the channel's service config: see
:func:`build_service_config`."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from rerank_client import health as _health
from rerank_client._proto import rerank_pb2 as pb
from rerank_client._proto import rerank_pb2_grpc as pb_grpc

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"
#: A document as sent: a string, or an object such as ``{"text": ...}`` (any JSON-like mapping).
Document = str | Mapping[str, Any]
_CODES = {c.value[0]: c for c in grpc.StatusCode}
RERANK_SERVICE = "rerank.v1.Rerank"
MAX_RETRIES = 4  # gRPC caps a call at 5 attempts (grpc-core clamps retryPolicy.maxAttempts to 5)
#: Keepalive pings: a dead peer (a node gone, a dropped connection) is noticed within ~30 s, even
#: on an idle channel. The server allows pings this often (rerank-server's
#: grpc.http2.min_ping_interval_without_data_ms is 10 s, half of this); pings more frequent than a
#: server allows get the connection closed with GOAWAY "too_many_pings".
KEEPALIVE_OPTIONS = (("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0))


def build_service_config(*, load_balancing: str = "round_robin", health_check: bool = True,
                         max_retries: int = MAX_RETRIES, initial_backoff: float = 0.1,
                         max_backoff: float = 5.0) -> dict[str, Any]:
    """The gRPC service config the clients give their channel (the ``grpc.service_config``
    channel option), as a dict.

    - ``loadBalancingConfig``: ``round_robin`` (one connection to every address the target
      resolves to, each call on the next ready one) or ``pick_first`` (one connection).
    - ``healthCheckConfig`` (``health_check``): each connection watches ``grpc.health.v1`` for
      ``rerank.v1.Rerank``; a replica that is loading or draining (NOT_SERVING) gets no new calls.
      gRPC applies it with ``round_robin`` only.
    - ``retryPolicy`` on every ``rerank.v1.Rerank`` method: up to ``max_retries`` (at most 4)
      retries of a call that failed with UNAVAILABLE (a refused or reset connection, a replica
      shutting down: reranking is idempotent), the first after a random wait of up to
      ``initial_backoff`` seconds, each next bound doubled up to ``max_backoff``; never past the
      call's deadline. ``max_retries=0``: no retries.

    Example (what ``RerankClient(target)`` uses)::

        >>> build_service_config()["loadBalancingConfig"]
        [{'round_robin': {}}]
    """
    if not 0 <= max_retries <= MAX_RETRIES:
        raise ValueError(f"max_retries must be in 0..{MAX_RETRIES} (gRPC allows at most 5 attempts), "
                         f"got {max_retries}; to wait for a server that is not up yet, use wait_for_ready=True")
    if initial_backoff <= 0 or max_backoff < initial_backoff:
        raise ValueError("need 0 < initial_backoff <= max_backoff")
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": RERANK_SERVICE}
    if max_retries:
        config["methodConfig"] = [{"name": [{"service": RERANK_SERVICE}], "retryPolicy": {
            "maxAttempts": max_retries + 1, "initialBackoff": f"{initial_backoff:.3f}s",
            "maxBackoff": f"{max_backoff:.3f}s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}]
    return config


class RerankError(Exception):
    """A failed call: the gRPC status ``code`` (a ``grpc.StatusCode``) and the server's ``message``.

    Example::

        try:
            client.rerank("q", ["a"], model="nope")
        except RerankError as e:
            print(e.code.name, e.message)  # NOT_FOUND model 'nope' is not served here; ...
    """

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.request_id = code, message, request_id

    @classmethod
    def from_code_number(cls, number: int, message: str, request_id: str | None = None) -> RerankError:
        """From a REST error body's numeric ``code``."""
        return cls(_CODES.get(number, grpc.StatusCode.UNKNOWN), message, request_id)

    @classmethod
    def _from_rpc(cls, e: grpc.RpcError) -> RerankError:
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        try:
            trailing = dict(e.trailing_metadata() or ())
        except Exception:  # noqa: BLE001 - some RpcErrors (e.g. from interceptors) carry none
            trailing = {}
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", trailing.get("x-request-id"))


@dataclass(frozen=True)
class RerankResult:
    """One ranked document: its position in the request, its score, and (when asked) the document.

    ``document`` (with ``return_documents``): a string as sent. An object, over gRPC, is the
    ``google.protobuf.Value`` the server received and returned, whose numbers are doubles: every
    number comes back a ``float`` (``{"id": 7}`` as ``{"id": 7.0}``, equal but not an ``int``;
    an integer beyond 2**53 rounded to the nearest double); strings, booleans, None, lists and
    nesting come back unchanged. Over REST (``from_json``) it is the JSON as sent."""

    index: int
    relevance_score: float
    document: str | dict[str, Any] | None = None
    chunk_index: int | None = None  # with max_chunks_per_doc: the best-scoring window


@dataclass(frozen=True)
class RerankResponse:
    """Results sorted by ``relevance_score`` descending (ties: lower index first)."""

    id: str
    model: str
    results: list[RerankResult]
    prompt_tokens: int
    created: int

    @classmethod
    def from_proto(cls, m: pb.RerankResponse) -> RerankResponse:
        results = [RerankResult(r.index, r.relevance_score,
                                json_format.MessageToDict(r.document) if r.HasField("document") else None,
                                r.chunk_index if r.HasField("chunk_index") else None) for r in m.results]
        return cls(m.id, m.model, results, m.usage.prompt_tokens, m.created)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RerankResponse:
        """From the REST body (``POST /v1/rerank``)."""
        results = [RerankResult(int(r["index"]), float(r["relevance_score"]), r.get("document"), r.get("chunk_index"))
                   for r in d.get("results", [])]
        return cls(d.get("id", ""), d.get("model", ""), results, int(d.get("usage", {}).get("prompt_tokens", 0)),
                   int(d.get("created", 0)))


def to_value(document: Any) -> struct_pb2.Value:
    """A Python JSON-like value (``str``, ``dict``, ...) as a ``google.protobuf.Value``."""
    try:
        return json_format.ParseDict(document, struct_pb2.Value())
    except json_format.ParseError as e:
        raise TypeError(f"a document must be a str or a JSON-like dict, got {type(document).__name__}: {e}") from None


def build_request(query: str, documents: Sequence[Document], *, model: str = DEFAULT_MODEL,
                  top_n: int | None = None, return_documents: bool = False, raw_scores: bool = False,
                  rank_fields: Sequence[str] | None = None, max_tokens_per_doc: int | None = None,
                  max_chunks_per_doc: int | None = None, instruction: str | None = None) -> pb.RerankRequest:
    """The ``pb.RerankRequest``; its protobuf JSON mapping is the REST body. ``instruction``:
    an LLM reranker's task instruction (cross-encoders refuse it)."""
    if isinstance(documents, (str, bytes)):
        raise TypeError("documents must be a list of documents, not a single string")
    request = pb.RerankRequest(model=model, query=query, documents=[to_value(d) for d in documents],
                               rank_fields=list(rank_fields or ()))
    for name, value in (("top_n", top_n), ("max_tokens_per_doc", max_tokens_per_doc),
                        ("max_chunks_per_doc", max_chunks_per_doc), ("instruction", instruction)):
        if value is not None:
            setattr(request, name, value)
    if return_documents:
        request.return_documents = True
    if raw_scores:
        request.raw_scores = True
    return request


def build_score_request(text_1: str | Sequence[str], text_2: str | Sequence[str], *, model: str = DEFAULT_MODEL,
                        raw_scores: bool = False, truncate: bool | None = None,
                        instruction: str | None = None) -> pb.ScoreRequest:
    """The ``pb.ScoreRequest`` (vLLM's pair scoring): ``text_1`` one string paired with every
    ``text_2``, or a list as long as ``text_2``."""
    request = pb.ScoreRequest(model=model, text_1=to_value(text_1 if isinstance(text_1, str) else list(text_1)),
                              text_2=to_value(text_2 if isinstance(text_2, str) else list(text_2)))
    if raw_scores:
        request.raw_scores = True
    if truncate is not None:
        request.truncate = truncate
    if instruction is not None:
        request.instruction = instruction
    return request


def _scores(reply: pb.ScoreResponse) -> list[float]:
    return [d.score for d in sorted(reply.data, key=lambda d: d.index)]


class _Base:
    def __init__(self, target: str, *, api_key: str | None, secure: bool, root_certificates: bytes | None,
                 timeout: float | None, max_retries: int, initial_backoff: float, max_backoff: float,
                 load_balancing: str, health_check: bool, wait_for_ready: bool,
                 service_config: Mapping[str, Any] | str | None, options: Sequence[tuple[str, Any]]):
        config = service_config if service_config is not None else build_service_config(
            load_balancing=load_balancing, health_check=health_check, max_retries=max_retries,
            initial_backoff=initial_backoff, max_backoff=max_backoff)
        self.target, self.timeout, self.wait_for_ready = target, timeout, wait_for_ready
        self.service_config = config if isinstance(config, str) else json.dumps(config)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._credentials = grpc.ssl_channel_credentials(root_certificates) if secure or root_certificates else None
        # unlimited message sizes (the server enforces its own); reconnect no slower than the retry
        # backoff; the service config (balancing, health, retries) in force unless the caller
        # passes options of the same names, which win
        defaults = {"grpc.max_receive_message_length": -1, "grpc.max_send_message_length": -1,
                    "grpc.max_reconnect_backoff_ms": int(max_backoff * 1000), **dict(KEEPALIVE_OPTIONS),
                    "grpc.enable_retries": 1, "grpc.service_config": self.service_config,
                    "grpc.service_config_disable_resolution": 1}  # ours, not one from a DNS TXT record
        self._options = list({**defaults, **dict(options)}.items())

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class RerankClient(_Base):
    """Blocking client.

    Example::

        with RerankClient("localhost:50051", api_key="secret", timeout=10) as client:
            response = client.rerank("What is machine learning?",
                                     ["ML is a subset of AI.", {"text": "The weather is sunny."}],
                                     top_n=1, return_documents=True)
            best = response.results[0]
            print(best.index, best.relevance_score, best.document)  # 0 0.987... ML is a subset of AI.

    ``target``: any gRPC target: ``host:port``, ``dns:///host:port`` (every address the name
    resolves to, e.g. a Kubernetes headless Service; re-resolved when a connection closes),
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (a fixed list). ``timeout`` (seconds) is the default
    deadline of each call, retries included. Calls are spread over the target's servers by
    ``load_balancing`` (``round_robin``; ``pick_first``: one connection), only to those whose
    ``grpc.health.v1`` status is SERVING (``health_check``); a call that fails with UNAVAILABLE is
    retried by gRPC, on the next server, up to ``max_retries`` times (0..4; nothing else is
    retried) with backoff from ``initial_backoff`` to ``max_backoff`` seconds: see
    :func:`build_service_config`. ``service_config`` (a dict or JSON string) replaces that
    config whole.
    ``wait_for_ready``: a call made while no server is ready (all starting, loading or
    unreachable) waits for one, within its deadline, instead of failing with UNAVAILABLE.
    ``secure=True`` uses TLS with the system roots, or ``root_certificates`` (PEM bytes).
    ``options``: gRPC channel options, over the client's own. ``interceptors``: grpc client
    interceptors (they see each call once, not its retries).
    """

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, secure: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = 30.0,
                 max_retries: int = MAX_RETRIES, initial_backoff: float = 0.1, max_backoff: float = 5.0,
                 load_balancing: str = "round_robin", health_check: bool = True, wait_for_ready: bool = False,
                 service_config: Mapping[str, Any] | str | None = None,
                 options: Sequence[tuple[str, Any]] = (), interceptors: Sequence[Any] = ()):
        super().__init__(target, api_key=api_key, secure=secure, root_certificates=root_certificates,
                         timeout=timeout, max_retries=max_retries, initial_backoff=initial_backoff,
                         max_backoff=max_backoff, load_balancing=load_balancing, health_check=health_check,
                         wait_for_ready=wait_for_ready, service_config=service_config, options=options)
        self._channel = (grpc.secure_channel(target, self._credentials, self._options) if self._credentials
                         else grpc.insecure_channel(target, self._options))
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub = pb_grpc.RerankStub(channel)
        self._health_check = _health.check_method(channel)

    def rerank(self, query: str, documents: Sequence[Document], *, model: str = DEFAULT_MODEL,
               top_n: int | None = None, return_documents: bool = False, raw_scores: bool = False,
               rank_fields: Sequence[str] | None = None, max_tokens_per_doc: int | None = None,
               max_chunks_per_doc: int | None = None, timeout: float | None = None,
               instruction: str | None = None) -> RerankResponse:
        """Rank ``documents`` (strings or ``{"text": ...}`` dicts) by relevance to ``query``.
        With ``return_documents``, object documents come back with every number a float
        (gRPC carries them as ``google.protobuf.Value``: see :class:`RerankResult`).
        Raises :class:`RerankError`."""
        request = build_request(query, documents, model=model, top_n=top_n, return_documents=return_documents,
                                raw_scores=raw_scores, rank_fields=rank_fields,
                                max_tokens_per_doc=max_tokens_per_doc, max_chunks_per_doc=max_chunks_per_doc,
                                instruction=instruction)
        return RerankResponse.from_proto(self.rerank_pb(request, timeout=timeout))

    def rerank_pb(self, request: pb.RerankRequest, *, timeout: float | None = None) -> pb.RerankResponse:
        """The raw RPC (with the client's deadline, metadata and retries) on a ``pb.RerankRequest``."""
        return self._call(self._stub.Rerank, request, timeout)

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str], *, model: str = DEFAULT_MODEL,
              raw_scores: bool = False, truncate: bool | None = None, timeout: float | None = None,
              instruction: str | None = None) -> list[float]:
        """One score per (text_1, text_2[i]) pair, in ``text_2``'s order (the ``Score`` RPC,
        vLLM's pair scoring; sigmoid scores unless ``raw_scores``). Raises :class:`RerankError`."""
        request = build_score_request(text_1, text_2, model=model, raw_scores=raw_scores, truncate=truncate,
                                      instruction=instruction)
        return _scores(self._call(self._stub.Score, request, timeout))

    def _call(self, method, request, timeout: float | None):
        try:  # retries, if any, happen inside the channel (the service config's retryPolicy)
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata,
                          wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as e:
            raise RerankError._from_rpc(e) from None

    def health(self, service: str = "", timeout: float | None = None) -> bool:
        """True when grpc.health.v1 reports SERVING (``service``: "" for the server, or
        "rerank.v1.Rerank"); False when not serving or unreachable."""
        try:
            reply = self._health_check(_health.HealthCheckRequest(service=service),
                                       timeout=timeout or self.timeout or 5.0, metadata=self._metadata)
        except grpc.RpcError:
            return False
        return reply.status == _health.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRerankClient(_Base):
    """``grpc.aio`` client; same arguments (see :class:`RerankClient`) and results. Create it
    inside the event loop that uses it.

    Example::

        async def main() -> list[int]:
            async with AsyncRerankClient("localhost:50051", timeout=10) as client:
                response = await client.rerank("hi", ["hello", "bye"])
                return [r.index for r in response.results]

        asyncio.run(main())  # [0, 1]
    """

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, secure: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = 30.0,
                 max_retries: int = MAX_RETRIES, initial_backoff: float = 0.1, max_backoff: float = 5.0,
                 load_balancing: str = "round_robin", health_check: bool = True, wait_for_ready: bool = False,
                 service_config: Mapping[str, Any] | str | None = None,
                 options: Sequence[tuple[str, Any]] = (), interceptors: Sequence[Any] = ()):
        super().__init__(target, api_key=api_key, secure=secure, root_certificates=root_certificates,
                         timeout=timeout, max_retries=max_retries, initial_backoff=initial_backoff,
                         max_backoff=max_backoff, load_balancing=load_balancing, health_check=health_check,
                         wait_for_ready=wait_for_ready, service_config=service_config, options=options)
        interceptors = list(interceptors) or None
        self._channel = (grpc.aio.secure_channel(target, self._credentials, self._options, interceptors=interceptors)
                         if self._credentials else
                         grpc.aio.insecure_channel(target, self._options, interceptors=interceptors))
        self._stub = pb_grpc.RerankStub(self._channel)
        self._health_check = _health.check_method(self._channel)

    async def rerank(self, query: str, documents: Sequence[Document], *, model: str = DEFAULT_MODEL,
                     top_n: int | None = None, return_documents: bool = False, raw_scores: bool = False,
                     rank_fields: Sequence[str] | None = None, max_tokens_per_doc: int | None = None,
                     max_chunks_per_doc: int | None = None, timeout: float | None = None,
               instruction: str | None = None) -> RerankResponse:
        """See :meth:`RerankClient.rerank`."""
        request = build_request(query, documents, model=model, top_n=top_n, return_documents=return_documents,
                                raw_scores=raw_scores, rank_fields=rank_fields,
                                max_tokens_per_doc=max_tokens_per_doc, max_chunks_per_doc=max_chunks_per_doc,
                                instruction=instruction)
        return RerankResponse.from_proto(await self.rerank_pb(request, timeout=timeout))

    async def rerank_pb(self, request: pb.RerankRequest, *, timeout: float | None = None) -> pb.RerankResponse:
        """See :meth:`RerankClient.rerank_pb`."""
        return await self._call(self._stub.Rerank, request, timeout)

    async def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str], *, model: str = DEFAULT_MODEL,
                    raw_scores: bool = False, truncate: bool | None = None,
                    timeout: float | None = None, instruction: str | None = None) -> list[float]:
        """See :meth:`RerankClient.score`."""
        request = build_score_request(text_1, text_2, model=model, raw_scores=raw_scores, truncate=truncate,
                                      instruction=instruction)
        return _scores(await self._call(self._stub.Score, request, timeout))

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self._metadata,
                                wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as e:
            raise RerankError._from_rpc(e) from None

    async def health(self, service: str = "", timeout: float | None = None) -> bool:
        """See :meth:`RerankClient.health`."""
        try:
            reply = await self._health_check(_health.HealthCheckRequest(service=service),
                                             timeout=timeout or self.timeout or 5.0, metadata=self._metadata)
        except grpc.RpcError:
            return False
        return reply.status == _health.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
