"""The gateway as an ASGI app: annotated routes under /customer (and under
/api/v1/customer, where the upstream platform's current clients call them),
the OpenAPI document, and the web console's static files at /.

Every request is forwarded to the gRPC server over one channel, so
authentication, authorisation, validation and error mapping happen in one
place; the gateway only transcodes. The one exception, when enabled, is the
MQTT broker's authn/authz hooks (broker_hooks.py), answered from the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.gateway import http_metrics, openapi, routes, sse, status, transcode
from server.gateway.broker_hooks import BrokerHooks
from server.gateway.http_io import error_response, read_body
from server.gateway.upstream import UPSTREAM_PREFIX
from server.observability import health

log = logging.getLogger("pulse.gateway")

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
# Errors a stream raises before its first message (bad token, unknown
# device, invalid request) arrive within this; they become plain HTTP errors.
_STREAM_STARTUP_S = 0.5
# Headers passed on as gRPC metadata, and the error for a value that gRPC
# cannot carry (metadata values are printable ASCII).
_FORWARDED_HEADERS = {
    "authorization": grpc.StatusCode.UNAUTHENTICATED,
    "x-request-id": grpc.StatusCode.INVALID_ARGUMENT,
}
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _failed(route: routes.Route, error: grpc.aio.AioRpcError) -> JSONResponse:
    http, body, headers = status.from_rpc_error(error)
    if route.upstream is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        http = body["error"]["code"] = _UPSTREAM_INVALID
    return JSONResponse(body, status_code=http, headers=headers)


# What upstream's framework answers a request that fails validation.
_UPSTREAM_INVALID = 422


def _printable_ascii(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


class _BadHeader(ValueError):
    def __init__(self, name: str, code: grpc.StatusCode) -> None:
        super().__init__(f"the {name} header must be printable ASCII")
        self.code = code


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    forwarded = []
    for name, code in _FORWARDED_HEADERS.items():
        value = request.headers.get(name)
        if value is None:
            continue
        if not _printable_ascii(value):
            raise _BadHeader(name, code)
        forwarded.append((name, value))
    return tuple(forwarded)


class Gateway:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        services: Sequence[descriptor.ServiceDescriptor],
        *,
        max_body_bytes: int,
        stopping: asyncio.Event,
    ) -> None:
        self.routes = routes.routes_for(list(services))
        self._max_body = max_body_bytes
        self._stopping = stopping
        self._calls: dict[str, Any] = {}
        for route in self.routes:
            make = channel.unary_stream if route.streaming else channel.unary_unary
            self._calls[route.grpc_method] = make(
                route.grpc_method,
                request_serializer=route.request_class.SerializeToString,
                response_deserializer=route.response_class.FromString,
            )

    async def dispatch(self, request: Request) -> Response:
        path = request.url.path.removeprefix(UPSTREAM_PREFIX)
        allowed = []
        for route in self.routes:
            params = route.match(path)
            if params is None:
                continue
            if route.http_method != request.method:
                allowed.append(route.http_method)
                continue
            prefix = UPSTREAM_PREFIX if path != request.url.path else ""
            request.scope[http_metrics.ROUTE_KEY] = prefix + route.template
            return await self._serve(route, params, request)
        if allowed:
            response = error_response(
                405, grpc.StatusCode.UNIMPLEMENTED, f"{request.method} not allowed"
            )
            response.headers["Allow"] = ", ".join(sorted(set(allowed)))
            return response
        return error_response(404, grpc.StatusCode.NOT_FOUND, f"no API at {path}")

    async def _serve(
        self, route: routes.Route, params: dict[str, str], request: Request
    ) -> Response:
        try:
            metadata = _metadata(request)
        except _BadHeader as e:
            return error_response(status.HTTP_STATUS[e.code], e.code, str(e))
        body = await read_body(request, self._max_body) if route.body else b""
        if body is None:
            return error_response(
                413,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request body is larger than {self._max_body} bytes",
            )
        upstream = route.upstream
        try:
            message = transcode.build_request(
                route.request_class,
                body_field=route.body,
                body=body,
                path_params=params,
                query=request.query_params.multi_items(),
                headers=request.headers,
                infer_update_mask=route.http_method == "PATCH",
                defaults=upstream.defaults if upstream else None,
            )
        except transcode.BadRequest as e:
            invalid = 400 if upstream is None or isinstance(e, transcode.BadHeader) else 422
            return error_response(invalid, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if route.streaming:
            return await self._stream(route, message, metadata)
        try:
            reply: Message = await self._calls[route.grpc_method](message, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            return _failed(route, e)
        data = transcode.to_json(reply, transcode.read_mask(message))
        if upstream is not None:
            data = upstream.respond(message, data)
        etag = transcode.etag_of(reply, message)
        return Response(
            json.dumps(data, separators=(",", ":")).encode(),
            status_code=upstream.status if upstream else 200,
            media_type="application/json",
            headers={"ETag": etag} if etag else None,
        )

    async def _stream(
        self, route: routes.Route, message: Message, metadata: tuple[tuple[str, str], ...]
    ) -> Response:
        call = self._calls[route.grpc_method](message, metadata=metadata)
        responses = call.__aiter__()
        first = asyncio.ensure_future(responses.__anext__())
        done, _ = await asyncio.wait({first}, timeout=_STREAM_STARTUP_S)
        if first in done and first.exception() is not None:
            error = first.exception()
            if isinstance(error, grpc.aio.AioRpcError):
                return _failed(route, error)
            if isinstance(error, StopAsyncIteration):
                return StreamingResponse(iter(()), media_type="text/event-stream")
            raise error
        return StreamingResponse(
            sse.events(call, responses, first, self._stopping),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def create_app(
    channel: grpc.aio.Channel,
    services: Sequence[descriptor.ServiceDescriptor],
    *,
    max_body_bytes: int = 1 << 20,
    cors_origins: Sequence[str] = (),
    stopping: asyncio.Event | None = None,
    broker_hooks: BrokerHooks | None = None,
    readiness: health.Readiness | None = None,
) -> Starlette:
    """The gateway app. Setting `stopping` ends every open event stream with
    a "shutting down" error event, so the server can stop promptly; given
    `broker_hooks`, it also answers an MQTT broker's /mqtt/authn and /mqtt/authz.
    /healthz, /readyz (`readiness`'s checks, and that the gRPC server
    serves) and /metrics are the process's."""
    gateway = Gateway(
        channel, services, max_body_bytes=max_body_bytes, stopping=stopping or asyncio.Event()
    )
    document = openapi.document(gateway.routes)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(document)

    readiness = readiness or health.Readiness()
    readiness.add("grpc", health.grpc_serving(channel))
    mounts: list[Route | Mount] = [
        *health.routes(readiness),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/customer/{rest:path}", gateway.dispatch, methods=_ALL_METHODS),
        Route(UPSTREAM_PREFIX + "/customer/{rest:path}", gateway.dispatch, methods=_ALL_METHODS),
    ]
    if broker_hooks is not None:
        mounts.extend(broker_hooks.routes(max_body_bytes=max_body_bytes))
    if CONSOLE_DIR.is_dir():
        mounts.append(Mount("/", StaticFiles(directory=CONSOLE_DIR, html=True)))
    middleware = [Middleware(http_metrics.HttpMetrics)]
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=_ALL_METHODS,
                allow_headers=[
                    "authorization",
                    "content-type",
                    "if-match",
                    "last-event-id",
                    # The upstream web app sends it on every write.
                    "x-csrf-token",
                ],
                expose_headers=["etag", "retry-after"],
            )
        )
    return Starlette(routes=mounts, middleware=middleware)
