"""The processes as an operator runs them: readiness that follows the
database and the broker, and one JSON log event per call."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import asyncpg
import grpc
from pulse.device.v1 import devices_pb2, devices_pb2_grpc

from bench.harness import free_port
from server.auth import Role, mint_token
from server.observability.health import DatabaseProbe
from tests.conftest import TenantFactory, with_database
from tests.helpers import eventually
from tests.infra.own_postgres import migrated_postgres
from tests.observability.conftest import pulse_process


async def get_device(port: int, token: str, device_id: str, *, request_id: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        try:
            await stub.GetDevice(
                devices_pb2.GetDeviceRequest(device_id=device_id),
                metadata=(("authorization", f"Bearer {token}"), ("x-request-id", request_id)),
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


async def test_readiness_follows_the_database(tmp_path: Path) -> None:
    async with (
        migrated_postgres() as postgres,
        pulse_process("serve", postgres.url, tmp_path) as serve,
    ):
        http = serve.http
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {
            "status": "ready",
            "checks": {"database": "ok", "migrations": "ok"},
        }

        await postgres.stop()

        async def not_ready() -> bool:
            return (await http.get("/readyz")).status_code == 503

        await eventually(not_ready, what="/readyz failing once the database stopped")
        body = (await http.get("/readyz")).json()
        assert body["status"] == "not ready"
        assert body["checks"]["database"].startswith("database unreachable")
        # Alive all the same: a restart would not bring the database back.
        assert (await http.get("/healthz")).status_code == 200

        await postgres.start()

        async def ready_again() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await eventually(ready_again, timeout=30, what="/readyz passing again")
        metrics = await http.get("/metrics")
        assert "pulse_db_pool_max_connections" in metrics.text


async def test_an_evaluator_without_its_broker_is_alive_and_not_ready(
    dsn: str, tmp_path: Path
) -> None:
    nothing_there = f"mqtt://pulse-evaluator:secret@127.0.0.1:{free_port()}"
    evaluator = pulse_process("evaluator", dsn, tmp_path, MQTT_URL=nothing_there)
    async with evaluator as process:
        assert (await process.http.get("/healthz")).status_code == 200
        ready = await process.http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {
            "database": "ok",
            "migrations": "ok",
            "broker": "the MQTT broker is not connected",
        }


async def test_readiness_names_the_migrations_a_database_lacks(server_url: str) -> None:
    name = f"pulse_unmigrated_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        probe = DatabaseProbe(with_database(server_url, name))
        try:
            assert await probe.reachable() is None
            why = await probe.migrations_current()
            assert why is not None and why.startswith("migrations not applied: 0001_registry.sql")
        finally:
            await probe.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_one_json_log_event_per_call_and_never_a_token(
    dsn: str, tmp_path: Path, make_tenant: TenantFactory
) -> None:
    secret = secrets.token_hex(32)
    tenant_id = (await make_tenant()).tenant_id  # tokens signed with this process's secret
    token = mint_token(
        secret.encode(), tenant_id=tenant_id, role=Role.VIEWER, subject="alice", audience="pulse"
    )
    serving = pulse_process("serve", dsn, tmp_path, PULSE_SECRET=secret, PULSE_LOG_FORMAT="json")
    forged = token[:-4] + "AAAA"
    async with serving as serve:
        code = await get_device(serve.grpc_port, token, "NOPE", request_id="req-42")
        refused = await get_device(serve.grpc_port, forged, "NOPE", request_id="req-43")
    assert code == grpc.StatusCode.NOT_FOUND
    assert refused == grpc.StatusCode.UNAUTHENTICATED
    text = serve.log_file.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    calls = [e for e in events if e.get("logger") == "pulse.rpc"]
    assert len(calls) == 2, text
    call, unauthenticated = sorted(calls, key=lambda e: str(e["request_id"]))
    assert call["message"] == "call"
    assert call["method"] == "/pulse.device.v1.DeviceRegistryService/GetDevice"
    assert call["code"] == "NOT_FOUND"
    assert call["tenant"] == str(tenant_id)
    assert call["caller"] == "alice"
    assert call["request_id"] == "req-42"
    assert call["level"] == "INFO"
    assert 0 < call["duration_ms"] < 10_000
    assert "time" in call
    assert unauthenticated["code"] == "UNAUTHENTICATED"
    assert unauthenticated["tenant"] is None and unauthenticated["caller"] is None
    for sent in (token, forged):
        assert sent not in text and sent.split(".")[2] not in text
