"""The interceptor chain: request logging, error mapping, authentication.

Order matters and is fixed in `chain()`: logging sees every outcome, the error
mapper turns domain errors raised by auth or handlers into rich statuses, and
auth runs closest to the handler.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from server.auth import Role, TokenVerifier, reset_principal, set_principal
from server.db import CONNECTION_LOST
from server.errors import (
    DomainError,
    PermissionDenied,
    Unauthenticated,
    internal_status,
    unavailable_status,
)
from server.permissions import REQUIRED_ROLE, is_open

log = logging.getLogger("pulse.rpc")

Context = grpc.aio.ServicerContext[Any, Any]
# grpc-stubs types handlers for the sync server only; aio ones hold coroutines.
Handler = Any
Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]


class _AroundInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps unary-request handlers (unary and server-streaming responses).

    The wrapped handler is built once per method and reused: grpc.aio asks
    every interceptor for a handler on every call, and building one per call
    costs more than the wrapping itself. Per-call data (metadata) is read from
    the context. Client-streaming methods (only reflection has them) pass
    through untouched.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        wrapped = self._wrap(handler, method)
        self._handlers[method] = wrapped
        return wrapped

    def _wrap(self, handler: Handler, method: str) -> Handler:
        if handler.response_streaming:
            inner_stream: Streaming = handler.unary_stream

            # An async generator function, not a function returning one:
            # grpc.aio runs any other kind of streaming handler as a sync
            # generator in its thread pool.
            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                async for item in self.around_stream(inner_stream, request, context, method):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        inner: Unary = handler.unary_unary

        async def unary(request: Any, context: Context) -> Any:
            return await self.around_unary(inner, request, context, method)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def around_unary(self, inner: Unary, request: Any, context: Context, method: str) -> Any:
        return await inner(request, context)

    async def around_stream(
        self, inner: Streaming, request: Any, context: Context, method: str
    ) -> AsyncIterator[Any]:
        async for item in inner(request, context):
            yield item


def _metadata(context: Context, key: str) -> str | None:
    for k, value in context.invocation_metadata() or ():
        if k == key:
            return str(value)
    return None


class LoggingInterceptor(_AroundInterceptor):
    """One line per call: method, outcome, duration and a request id."""

    def _request_id(self, context: Context) -> str:
        return _metadata(context, "x-request-id") or uuid.uuid4().hex[:16]

    def _done(self, method: str, rid: str, start: float, context: Context) -> None:
        code = context.code() or grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        log.info("%s %s %.1fms rid=%s", method, name, (time.perf_counter() - start) * 1000, rid)

    async def around_unary(self, inner: Unary, request: Any, context: Context, method: str) -> Any:
        rid, start = self._request_id(context), time.perf_counter()
        try:
            return await inner(request, context)
        finally:
            self._done(method, rid, start, context)

    async def around_stream(
        self, inner: Streaming, request: Any, context: Context, method: str
    ) -> AsyncIterator[Any]:
        rid, start = self._request_id(context), time.perf_counter()
        try:
            async for item in inner(request, context):
                yield item
        finally:
            self._done(method, rid, start, context)


class ErrorInterceptor(_AroundInterceptor):
    """Domain errors become rich statuses; anything else is INTERNAL and logged."""

    async def _abort(self, error: BaseException, context: Any, method: str) -> None:
        if isinstance(error, DomainError):
            await context.abort_with_status(rpc_status.to_status(error.to_status()))
        if isinstance(error, CONNECTION_LOST):
            log.warning("database unavailable in %s: %s", method, error)
            await context.abort_with_status(rpc_status.to_status(unavailable_status()))
        # The traceback goes to the log; the request body never does.
        log.error("unhandled error in %s", method, exc_info=error)
        await context.abort_with_status(rpc_status.to_status(internal_status()))

    async def around_unary(self, inner: Unary, request: Any, context: Context, method: str) -> Any:
        try:
            return await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await self._abort(error, context, method)

    async def around_stream(
        self, inner: Streaming, request: Any, context: Context, method: str
    ) -> AsyncIterator[Any]:
        try:
            async for item in inner(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await self._abort(error, context, method)


class AuthInterceptor(_AroundInterceptor):
    """Verifies the bearer token and checks the role table before the handler."""

    def __init__(self, verifier: TokenVerifier) -> None:
        super().__init__()
        self._verifier = verifier

    async def _authorize(self, method: str, context: Context) -> Any:
        header = _metadata(context, "authorization")
        if not header:
            raise Unauthenticated("missing bearer token in the authorization metadata")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        principal = await self._verifier.verify(token.strip())
        required = REQUIRED_ROLE.get(method)
        if required is None:
            raise PermissionDenied(f"{method} is not open to any role")
        if principal.role < required:
            raise PermissionDenied(
                f"{method} needs the {required.name.lower()} role; "
                f"the token has {principal.role.name.lower()}"
            )
        return set_principal(principal)

    async def around_unary(self, inner: Unary, request: Any, context: Context, method: str) -> Any:
        if is_open(method):
            return await inner(request, context)
        token = await self._authorize(method, context)
        try:
            return await inner(request, context)
        finally:
            reset_principal(token)

    async def around_stream(
        self, inner: Streaming, request: Any, context: Context, method: str
    ) -> AsyncIterator[Any]:
        if not is_open(method):
            set_principal_token = await self._authorize(method, context)
            del set_principal_token  # the generator's context ends with the stream
        async for item in inner(request, context):
            yield item


def chain(verifier: TokenVerifier) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    return [LoggingInterceptor(), ErrorInterceptor(), AuthInterceptor(verifier)]


__all__ = ["Role", "chain"]
