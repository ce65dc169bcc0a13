"""Traces: one trace from a browser's request through the gateway, the gRPC
server and the database to the evaluator's MQTT publish, exported over OTLP
to a collector (a real gRPC one, in this test) and named in the log lines."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from server.auth import Role, mint_token
from server.demo import DEMO_TENANT
from tests.helpers import eventually
from tests.observability.conftest import pulse_process


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[trace_pb2.Span]:
        return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    server = grpc.aio.server()
    received = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield received, port
    finally:
        await server.stop(None)


async def test_one_trace_from_the_gateway_to_the_device_publish(
    dsn: str, tmp_path: Path, collector: tuple[Collector, int]
) -> None:
    received, port = collector
    secret = secrets.token_hex(32)
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    run = pulse_process(
        "run",
        dsn,
        tmp_path,
        PULSE_SECRET=secret,
        PULSE_GRPC_PORT="0",
        PULSE_LOG_FORMAT="json",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    async with run as pulse:
        token = mint_token(secret.encode(), tenant_id=DEMO_TENANT, role=Role.ADMIN)
        response = await pulse.http.patch(
            "/customer/devices/DEVICE-06/twin/desired",
            json={"desired": {"mode": "traced"}, "force": True},
            headers={
                "authorization": f"Bearer {token}",
                "traceparent": f"00-{trace_id}-{caller_span}-01",
            },
        )
        assert response.status_code == 200, response.text

        def published() -> bool:
            return any(s.name == "publish twin/desired" for s in received.trace(trace_id))

        await eventually(published, timeout=30, what="the publish span in the caller's trace")
    spans = received.trace(trace_id)
    kinds = {(s.kind, s.name) for s in spans}
    method = "/pulse.device.v1.TwinService/UpdateDesired"
    assert (trace_pb2.Span.SPAN_KIND_CLIENT, method) in kinds  # the gateway's call
    assert (trace_pb2.Span.SPAN_KIND_SERVER, method) in kinds
    servers = [s for s in spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER]
    assert any(s.parent_span_id.hex() == caller_span for s in servers), "the caller's continued"
    server_span = next(
        s for s in spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER and s.name == method
    )
    queries = [s for s in spans if s.parent_span_id == server_span.span_id]
    assert any(
        attr.key == "db.system" and attr.value.string_value == "postgresql"
        for s in queries
        for attr in s.attributes
    ), "the database queries are children of the call"
    publish = next(s for s in spans if s.name == "publish twin/desired")
    assert publish.kind == trace_pb2.Span.SPAN_KIND_PRODUCER
    assert publish.parent_span_id == server_span.span_id

    lines = pulse.log_file.read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]  # not the banner
    [call] = [e for e in events if e.get("message") == "call" and e.get("method") == method]
    assert call["trace_id"] == trace_id
