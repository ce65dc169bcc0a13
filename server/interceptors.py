"""The interceptor chain: metrics and the call's log event, error mapping,
then admission (`server.admission`: decoding, authentication, limits), in the
order fixed in `chain()`."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_status import rpc_status

from server import decoding, transient
from server.errors import DomainError, internal_status
from server.observability import logs, metrics

log = logging.getLogger("pulse.rpc")

Context = grpc.aio.ServicerContext[Any, Any]
# grpc-stubs types handlers for the sync server only; aio ones hold coroutines.
Handler = Any
Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]


class AroundInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
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
                request_deserializer=decoding.safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        inner: Unary = handler.unary_unary

        async def unary(request: Any, context: Context) -> Any:
            return await self.around_unary(inner, request, context, method)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=decoding.safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def around_unary(self, inner: Unary, request: Any, context: Context, method: str) -> Any:
        return await inner(request, context)

    async def around_stream(
        self, inner: Streaming, request: Any, context: Context, method: str
    ) -> AsyncIterator[Any]:
        async for item in inner(request, context):
            yield item


def metadata_value(context: Context, key: str) -> str | None:
    for k, value in context.invocation_metadata() or ():
        if k == key:
            return str(value)
    return None


@dataclass(slots=True)
class CallRecord:
    """What the log event of a call says about who made it, filled in by
    admission once the token is verified."""

    tenant: str | None = None
    caller: str | None = None


current_call: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "current_call", default=None
)


class _MethodMetrics:
    """One method's metric children, looked up once instead of per call."""

    __slots__ = ("_handled", "_labels", "seconds", "started", "streams")

    def __init__(self, method: str, streaming: bool) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        kind = "server_stream" if streaming else "unary"
        self._labels = (kind, service, name)
        self.started = metrics.GRPC_STARTED.labels(*self._labels)
        self.seconds = metrics.GRPC_HANDLING_SECONDS.labels(*self._labels)
        # Only streams have a series of open ones.
        self.streams = metrics.WATCH_STREAMS.labels(name) if streaming else None
        self._handled: dict[str, Any] = {}

    def handled(self, code: str) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = metrics.GRPC_HANDLED.labels(*self._labels, code)
        return child


class ObservingInterceptor(AroundInterceptor):
    """Per call: its metrics, and one log event with method, status code,
    duration, tenant, caller and request id (never a token or a body)."""

    def __init__(self) -> None:
        super().__init__()
        self._metrics: dict[str, _MethodMetrics] = {}

    def _method_metrics(self, method: str, streaming: bool) -> _MethodMetrics:
        found = self._metrics.get(method)
        if found is None:
            found = self._metrics[method] = _MethodMetrics(method, streaming)
        return found

    def _begin(self, context: Context) -> CallRecord:
        logs.request_id.set(metadata_value(context, "x-request-id") or os.urandom(8).hex())
        record = CallRecord()
        current_call.set(record)
        return record

    def _done(
        self,
        method: str,
        measured: _MethodMetrics,
        record: CallRecord,
        start: float,
        context: Context,
        cancelled: bool,
    ) -> None:
        elapsed = time.perf_counter() - start
        code = grpc.StatusCode.CANCELLED if cancelled else context.code() or grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        measured.handled(name).inc()
        measured.seconds.observe(elapsed)
        if not log.isEnabledFor(logging.INFO):
            return
        log.info(
            "call",
            extra={
                "method": method,
                "code": name,
                "duration_ms": round(elapsed * 1000, 3),
                "tenant": record.tenant,
                "caller": record.caller,
            },
        )

    async def around_unary(self, inner: Unary, request: Any, context: Context, method: str) -> Any:
        measured = self._method_metrics(method, streaming=False)
        measured.started.inc()
        record, start, cancelled = self._begin(context), time.perf_counter(), False
        try:
            return await inner(request, context)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._done(method, measured, record, start, context, cancelled)

    async def around_stream(
        self, inner: Streaming, request: Any, context: Context, method: str
    ) -> AsyncIterator[Any]:
        measured = self._method_metrics(method, streaming=True)
        assert measured.streams is not None
        measured.started.inc()
        measured.streams.inc()
        record, start, cancelled = self._begin(context), time.perf_counter(), False
        try:
            async for item in inner(request, context):
                yield item
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            measured.streams.dec()
            self._done(method, measured, record, start, context, cancelled)


class ErrorInterceptor(AroundInterceptor):
    """Domain errors become rich statuses; transient database errors are
    retried (unary calls only) and then answer UNAVAILABLE or ABORTED;
    anything else is INTERNAL and logged.

    A unary call is retried whole, which is safe because a handler's writes
    are one transaction: a transient error before COMMIT means nothing was
    written. A connection lost during COMMIT (CommitOutcomeUnknown) is not
    retried. Streams are not retried: they may have sent messages already.
    """

    async def _abort(self, error: BaseException, context: Any, method: str) -> None:
        if isinstance(error, DomainError):
            await context.abort_with_status(rpc_status.to_status(error.to_status()))
        if transient.is_transient(error):
            log.warning("transient database error in %s: %r", method, error)
            await context.abort_with_status(rpc_status.to_status(transient.status(error)))
        # The traceback goes to the log; the request body never does.
        log.error("unhandled error in %s", method, exc_info=error)
        await context.abort_with_status(rpc_status.to_status(internal_status()))

    async def around_unary(self, inner: Unary, request: Any, context: Context, method: str) -> Any:
        try:
            return await transient.retry(
                lambda: inner(request, context), budget_s=context.time_remaining()
            )
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


def chain(admission: AroundInterceptor) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """Observing sees every outcome, the error mapper turns what admission and
    handlers raise into rich statuses, and admission runs next to the handler."""
    return [ObservingInterceptor(), ErrorInterceptor(), admission]
