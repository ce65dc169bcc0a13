"""Watch streams across failures: PostgreSQL dropping every connection, a
server shutting down, and two server processes sharing one database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pulse_client as pc
import pytest

from server import config
from server.app import start
from server.connectivity.transitions import Transition
from server.db import Database
from server.transient import TRANSIENT
from tests.conftest import Tenant

from .conftest import Collector, create_devices, flap

ROOT = Path(__file__).resolve().parents[2]


async def _flap_retrying(
    db: Database, tenant: Tenant, devices: list[str], rounds: int
) -> list[Transition]:
    """`flap`, retried while the pool replaces connections PostgreSQL dropped."""
    for _ in range(50):
        try:
            return await flap(db, tenant.tenant_id, devices, rounds)
        except TRANSIENT:
            await asyncio.sleep(0.1)
    raise AssertionError("the database did not come back")


async def test_streams_survive_postgresql_dropping_every_connection(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, dsn: str
) -> None:
    devices = ["PG-1", "PG-2"]
    await create_devices(client, devices)
    watch = Collector.start(client.connectivity.watch())
    narrowed = Collector.start(client.connectivity.watch(device_ids=["PG-2"]))
    await watch.wait_ready()
    await narrowed.wait_ready()
    before = await flap(fleet_db, tenant.tenant_id, devices, 1)
    await watch.wait_events(2)

    # What a restart looks like to the server: every connection it holds
    # (pool and LISTEN) is cut. Events then commit before it has reconnected.
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    during = await _flap_retrying(fleet_db, tenant, devices, 2)
    after = await _flap_retrying(fleet_db, tenant, devices, 1)

    sent = before + during + after
    await watch.wait_events(len(sent))
    await narrowed.wait_events(len(sent) // 2)
    assert watch.ids == [t.event_id for t in sent]
    assert narrowed.ids == [t.event_id for t in sent if t.device_id == "PG-2"]
    assert watch.error is None
    await watch.stop()
    await narrowed.stop()


async def test_server_shutdown_ends_streams_with_unavailable_and_a_cursor_to_resume(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    fleet_db: Database,
    settings: config.Settings,
    dsn: str,
) -> None:
    devices = ["SD-1"]
    await create_devices(client, devices)
    second = await start(dataclasses.replace(settings, db_pool_size=2), dsn)
    stopped = False
    try:
        async with await pc.AsyncPulseClient.connect(
            f"127.0.0.1:{second.port}", token=tenant.token()
        ) as other:
            watch = Collector.start(other.connectivity.watch())
            await watch.wait_ready()
            before = await flap(fleet_db, tenant.tenant_id, devices, 2)
            await watch.wait_events(2)
            await second.stop(grace=10)
            stopped = True
            await watch.wait_done()
        assert isinstance(watch.error, pc.Unavailable)
        assert watch.error.reason == "SERVER_SHUTTING_DOWN"
        assert watch.ids == [t.event_id for t in before]
        cursor = watch.error.metadata["cursor"]
    finally:
        if not stopped:
            await second.stop(grace=1)

    after = await flap(fleet_db, tenant.tenant_id, devices, 2)
    resumed = Collector.start(client.connectivity.watch(resume_cursor=cursor))
    await resumed.wait_events(2)
    await resumed.wait_ready()
    assert resumed.ids == [t.event_id for t in after]
    await resumed.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def server_process(settings: config.Settings, dsn: str) -> AsyncIterator[str]:
    """The real server in a process of its own; yields its address."""
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "PULSE_SECRET": settings.secret.decode(),
        "PULSE_DATA_DIR": str(settings.data_dir),
        "PULSE_DB_POOL_SIZE": "2",
        "PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.serve", cwd=ROOT, env=env
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


async def test_two_server_processes_each_deliver_every_event_to_their_watchers(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    fleet_db: Database,
    settings: config.Settings,
    dsn: str,
) -> None:
    devices = ["TWO-1", "TWO-2", "TWO-3"]
    await create_devices(client, devices)
    async with server_process(settings, dsn) as address:
        # connect() waits until the other process accepts calls.
        other = await pc.AsyncPulseClient.connect(address, token=tenant.token(), timeout=30)
        try:
            here = [Collector.start(client.connectivity.watch()) for _ in range(2)]
            there = [Collector.start(other.connectivity.watch()) for _ in range(2)]
            narrowed_there = Collector.start(other.connectivity.watch(device_ids=["TWO-3"]))
            for watch in [*here, *there, narrowed_there]:
                await watch.wait_ready()
            sent = await flap(fleet_db, tenant.tenant_id, devices, 4)
            for watch in [*here, *there]:
                await watch.wait_events(len(sent))
                assert watch.ids == [t.event_id for t in sent]
            await narrowed_there.wait_events(4)
            assert narrowed_there.ids == [t.event_id for t in sent if t.device_id == "TWO-3"]

            # A cursor from one process resumes on the other.
            cursor = here[0].messages[3].cursor  # after the third event
            moved = Collector.start(other.connectivity.watch(resume_cursor=cursor))
            await moved.wait_ready()
            assert moved.ids == [t.event_id for t in sent[3:]]
            for watch in [*here, *there, narrowed_there, moved]:
                await watch.stop()
        finally:
            await other.close()


@pytest.fixture(autouse=True)
def _quiet_reconnect_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR", logger="server.listener")
