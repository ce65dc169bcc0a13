"""PostgreSQL restarting under a running API server: calls during the outage
answer UNAVAILABLE (never INTERNAL or UNKNOWN), and calls after it succeed
without restarting the server.

The test runs a PostgreSQL of its own (tests/infra/own_postgres.py), since it
stops and starts it: same data, same socket address.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pulse_client as pc
import pytest

from server import config
from server.app import start
from server.auth import Role, mint_token
from server.tenants import ensure_tenant
from tests.infra.own_postgres import OwnPostgres, migrated_postgres


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    async with migrated_postgres() as postgres:
        yield postgres


async def test_calls_during_a_postgresql_restart_answer_unavailable_then_succeed(
    own_postgres: OwnPostgres, settings: config.Settings
) -> None:
    postgres, url = own_postgres, own_postgres.url
    tenant_id = uuid.uuid4()
    admin = await asyncpg.connect(url)
    try:
        await ensure_tenant(admin, tenant_id, "restart")
    finally:
        await admin.close()
    token = mint_token(
        settings.secret, tenant_id=tenant_id, role=Role.ADMIN, audience=settings.jwt_audience
    )
    running = await start(settings, url)
    try:
        async with await pc.AsyncPulseClient.connect(
            f"127.0.0.1:{running.port}", token=token
        ) as client:
            await client.devices.create("RESTART-1")
            # Concurrent calls, so the pool holds several connections for
            # the shutdown to kill.
            await asyncio.gather(*(client.devices.get("RESTART-1") for _ in range(4)))

            # Calls keep coming while PostgreSQL stops and starts again.
            outcomes: collections.Counter[str] = collections.Counter()
            done = asyncio.Event()

            async def keep_calling() -> None:
                while not done.is_set():
                    try:
                        await client.devices.get("RESTART-1")
                        outcomes["OK"] += 1
                    except pc.PulseError as error:
                        outcomes[error.code.name] += 1
                    await asyncio.sleep(0.01)

            background = asyncio.create_task(keep_calling())
            await postgres.stop()
            with pytest.raises(pc.Unavailable) as read:
                await client.devices.get("RESTART-1")
            with pytest.raises(pc.Unavailable) as write:
                await client.devices.create("RESTART-2")
            assert read.value.reason_name == write.value.reason_name == "DATABASE_UNAVAILABLE"

            assert await postgres.start() == url
            done.set()
            await background
            assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
            assert outcomes["UNAVAILABLE"]
            assert (await client.devices.get("RESTART-1")).device_id == "RESTART-1"
            await client.devices.create("RESTART-2")
            assert (await client.devices.get("RESTART-2")).device_id == "RESTART-2"
    finally:
        await running.stop(grace=1.0)
