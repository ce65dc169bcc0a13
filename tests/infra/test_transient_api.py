"""How the API answers transient database errors: the production error
interceptor in a real gRPC server, over handlers that meet real deadlocks and
lost connections in the real database."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pulse_client as pc
import pytest
from google.rpc import error_details_pb2

from server.db import Database
from server.interceptors import ErrorInterceptor
from server.transient import ATTEMPTS
from tests.conftest import Tenant

Handler = Callable[[], Awaitable[None]]


@dataclass
class Probe:
    """A gRPC server whose one method runs `handler` (set by each test)."""

    target: str = ""
    handler: Handler | None = None
    attempts: int = 0

    async def call(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            call = channel.unary_unary(
                "/probe.Probe/Call", request_serializer=None, response_deserializer=None
            )
            await call(b"")


@pytest.fixture
async def probe() -> AsyncIterator[Probe]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    probe = Probe()

    async def call(request: bytes, context: Any) -> bytes:
        probe.attempts += 1
        assert probe.handler is not None
        await probe.handler()
        return b""

    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "probe.Probe", {"Call": grpc.unary_unary_rpc_method_handler(call)}
            )
        ]
    )
    probe.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield probe
    finally:
        await server.stop(None)


async def _failure(probe: Probe) -> pc.PulseError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await probe.call()
    return pc.from_rpc_error(raised.value)


def _retry_delay_s(error: pc.PulseError) -> float:
    [info] = [d for d in error.details if isinstance(d, error_details_pb2.RetryInfo)]
    delay: float = info.retry_delay.ToTimedelta().total_seconds()
    return delay


def _lock_key() -> int:
    # Advisory locks are database-wide: keys of this test's own.
    return secrets.randbits(62)


def _deadlocking(db: Database, dsn: str, tenant: Tenant, times: int, probe: Probe) -> Handler:
    """A handler whose transaction is a deadlock's victim on its first
    `times` attempts, and succeeds after.

    The partner, a raw connection, takes lock b then waits for a; the
    handler holds a and then waits for b. The partner's deadlock_timeout is
    long, so the handler's backend is the one that finds the cycle.
    """
    a, b = _lock_key(), _lock_key()

    async def partner(has_b: asyncio.Event) -> None:
        con = await asyncpg.connect(dsn)
        try:
            await con.execute("SET deadlock_timeout = '60s'")
            async with con.transaction():
                await con.execute("SELECT pg_advisory_xact_lock($1)", b)
                has_b.set()
                await con.execute("SELECT pg_advisory_xact_lock($1)", a)
        finally:
            await con.close()

    async def handler() -> None:
        other: asyncio.Task[None] | None = None
        try:
            async with db.tenant(tenant.tenant_id) as con:
                await con.execute("SELECT pg_advisory_xact_lock($1)", a)
                if probe.attempts <= times:
                    has_b = asyncio.Event()
                    other = asyncio.create_task(partner(has_b))
                    await has_b.wait()
                await con.execute("SELECT pg_advisory_xact_lock($1)", b)
        finally:
            if other is not None:
                await other  # it finishes once the victim's rollback frees a

    return handler


async def test_a_deadlock_is_retried_and_then_succeeds(
    probe: Probe, db: Database, dsn: str, tenant: Tenant
) -> None:
    probe.handler = _deadlocking(db, dsn, tenant, 1, probe)
    await probe.call()
    assert probe.attempts == 2


async def test_a_deadlock_every_time_answers_aborted_with_a_retry_delay(
    probe: Probe, db: Database, dsn: str, tenant: Tenant
) -> None:
    probe.handler = _deadlocking(db, dsn, tenant, ATTEMPTS, probe)
    error = await _failure(probe)
    assert error.code == grpc.StatusCode.ABORTED
    assert error.reason_name == "TRANSACTION_CONFLICT"
    assert _retry_delay_s(error) > 0
    assert probe.attempts == ATTEMPTS


async def _kill(dsn: str, con: Any) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        pid = await con.fetchval("SELECT pg_backend_pid()")
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    finally:
        await admin.close()


async def test_a_connection_lost_before_commit_is_retried(
    probe: Probe, db: Database, dsn: str, tenant: Tenant
) -> None:
    async def handler() -> None:
        async with db.tenant(tenant.tenant_id) as con:
            if probe.attempts == 1:
                await _kill(dsn, con)
            await con.execute("SELECT 1")

    probe.handler = handler
    await probe.call()
    assert probe.attempts == 2


async def test_a_connection_lost_every_time_answers_unavailable(
    probe: Probe, db: Database, dsn: str, tenant: Tenant
) -> None:
    async def handler() -> None:
        async with db.tenant(tenant.tenant_id) as con:
            await _kill(dsn, con)
            await con.execute("SELECT 1")

    probe.handler = handler
    error = await _failure(probe)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason_name == "DATABASE_UNAVAILABLE"
    assert _retry_delay_s(error) > 0
    assert probe.attempts == ATTEMPTS


async def test_a_connection_lost_during_commit_is_not_retried(
    probe: Probe, db: Database, dsn: str, tenant: Tenant
) -> None:
    async def handler() -> None:
        async with db.tenant(tenant.tenant_id) as con:
            await _kill(dsn, con)

    probe.handler = handler
    error = await _failure(probe)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason_name == "OUTCOME_UNKNOWN"
    assert "outcome is unknown" in error.message
    assert probe.attempts == 1
