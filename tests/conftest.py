"""Shared fixtures: a real PostgreSQL, a fresh database per test session, and
the real gRPC server on a free port.

DATABASE_URL, when set, names a server whose login may create databases;
otherwise an embedded PostgreSQL starts in a temporary folder. Either way the
session works in its own new database and drops it at the end.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pulse_client import AsyncPulseClient

from bench.harness import seed_tenant
from evaluator.service import mqtt_broker
from server import config, migrate
from server.app import RunningServer, start
from server.auth import Role, mint_token
from server.db import Database, create_pool
from server.embedded import EmbeddedPostgres
from server.tenants import ensure_tenant


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
async def server_url() -> AsyncIterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix="pulse-test-pg-"))
    embedded = EmbeddedPostgres(folder / "pgdata")
    try:
        yield await embedded.start()
    finally:
        await embedded.stop()


@pytest.fixture(scope="session")
async def dsn(server_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test session."""
    name = f"pulse_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(server_url, name)
        await migrate.apply(url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def mqtt_url(db: Database) -> AsyncIterator[str]:
    """MQTT_URL (Mosquitto here and in CI), or an embedded broker with access
    control; either way, what the tests' own MQTT clients connect to, as the
    service identity `pulse-tests` on the embedded broker."""
    async with mqtt_broker(os.environ.get("MQTT_URL"), db, service="tests") as url:
        yield url


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> config.Settings:
    data = tmp_path_factory.mktemp("pulse-data")
    return config.load(
        {
            "PULSE_DATA_DIR": str(data),
            "PULSE_SECRET": secrets.token_hex(32),
            "PULSE_GRPC_PORT": "0",
            "PULSE_DB_POOL_SIZE": "8",
        }
    )


@pytest.fixture(scope="session")
async def running(settings: config.Settings, dsn: str) -> AsyncIterator[RunningServer]:
    server = await start(settings, dsn)
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


@pytest.fixture(scope="session")
def target(running: RunningServer) -> str:
    return f"127.0.0.1:{running.port}"


@pytest.fixture(scope="session")
async def db(dsn: str) -> AsyncIterator[Database]:
    """A pool of the tests' own, for arranging data and raw SQL checks."""
    database = Database(await create_pool(dsn, size=4))
    try:
        yield database
    finally:
        await database.close()


@dataclass(frozen=True)
class Tenant:
    tenant_id: uuid.UUID
    secret: bytes
    audience: str

    def token(self, role: Role = Role.ADMIN, **kwargs: Any) -> str:
        kwargs.setdefault("audience", self.audience)
        return mint_token(self.secret, tenant_id=self.tenant_id, role=role, **kwargs)


TenantFactory = Callable[[], Awaitable[Tenant]]


@pytest.fixture
def make_tenant(db: Database, settings: config.Settings) -> TenantFactory:
    async def factory() -> Tenant:
        tenant_id = uuid.uuid4()
        async with db.admin() as con:
            await ensure_tenant(con, tenant_id, f"tenant {tenant_id.hex[:6]}")
        return Tenant(tenant_id, settings.secret, settings.jwt_audience)

    return factory


@pytest.fixture
async def tenant(make_tenant: TenantFactory) -> Tenant:
    """A new tenant for each test, so tests never see each other's rows."""
    return await make_tenant()


FleetFactory = Callable[..., Awaitable[uuid.UUID]]


@pytest.fixture
async def seed_fleet_tenant(dsn: str, db: Database) -> AsyncIterator[FleetFactory]:
    """`bench.harness.seed_tenant` for a test: a new tenant with thousands of
    devices in one statement. They are deleted after the test, with their
    rollouts and queued publications, so that what later tests do over
    every tenant (a retained-state repair republishes every desired
    document) stays small."""
    tenants: list[uuid.UUID] = []

    async def seed(device_ids: Sequence[str], **kwargs: Any) -> uuid.UUID:
        tenant_id = await seed_tenant(dsn, device_ids, **kwargs)
        tenants.append(tenant_id)
        return tenant_id

    yield seed
    async with db.admin() as con:
        for table in ("rollouts", "twin_outbox", "devices"):
            await con.execute(f"DELETE FROM {table} WHERE tenant_id = ANY($1::uuid[])", tenants)


ClientFactory = Callable[..., Awaitable[AsyncPulseClient]]


@pytest.fixture
async def connect(target: str) -> AsyncIterator[ClientFactory]:
    """Open typed clients to the running server; all are closed after the test."""
    opened: list[AsyncPulseClient] = []

    async def factory(token: str | None = None) -> AsyncPulseClient:
        client = await AsyncPulseClient.connect(target, token=token)
        opened.append(client)
        return client

    yield factory
    for client in opened:
        await client.close()


@pytest.fixture
async def client(tenant: Tenant, connect: ClientFactory) -> AsyncPulseClient:
    """An admin client of a fresh tenant."""
    return await connect(tenant.token(Role.ADMIN))
