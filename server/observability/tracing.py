"""OpenTelemetry traces: off unless an OTLP endpoint is configured
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, and the
other standard OTEL_* variables), so that a process that exports nothing
pays nothing: no instrumentation is installed at all.

When on, the maintained instrumentations trace the gRPC server and its
clients (the gateway's calls carry the trace on), every asyncpg query, and
the gateway's HTTP requests; spans go out in batches over OTLP/gRPC. A
caller's `traceparent` continues its trace.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

log = logging.getLogger(__name__)

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any(env.get(name) for name in _ENDPOINTS)


class Tracing:
    """The process's tracer provider, flushed by `close()`."""

    def __init__(self, provider: Any) -> None:
        self._provider = provider

    def close(self) -> None:
        self._provider.shutdown()


def configure(service: str) -> Tracing | None:
    """Install tracing for this process when an endpoint is configured;
    `service` is its service.name unless OTEL_SERVICE_NAME says otherwise.
    Call before any gRPC server, channel or pool is made."""
    if not enabled():
        return None
    # Imported here: a process without tracing never loads the SDK.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorServer().instrument()  # type: ignore[no-untyped-call]
    GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]
    AsyncPGInstrumentor().instrument()  # type: ignore[no-untyped-call]
    log.info("tracing on: spans of %s go to %s", name, _endpoint())
    return Tracing(provider)


def _endpoint() -> str:
    return next(os.environ[name] for name in _ENDPOINTS if os.environ.get(name))


def asgi(app: Any) -> Any:
    """`app` with a server span per HTTP request, when tracing is on."""
    if not enabled():
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app)


_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def traceparent() -> str | None:
    """The W3C traceparent of the current span, or None (no span: tracing
    off, or outside a traced call). Checked to be hex digits and dashes:
    the database scope carries it in SQL text (server/db.py)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    value = f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    return value if _TRACEPARENT.fullmatch(value) else None


def continued(parent: str | None) -> Any:
    """The context of a remote `parent` traceparent, to start a span in."""
    if parent is None or not _TRACEPARENT.fullmatch(parent):
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": parent})


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the span the caller is in, as hex; None outside one."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
