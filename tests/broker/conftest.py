"""Fixtures for the broker access tests, whichever broker enforces the rules
(the embedded one, Mosquitto's dynamic security): MQTT logins for devices and
services, all unique so tests sharing a database never collide."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
import pytest
from pulse_client import AsyncPulseClient

from server.broker_access.rules import device_client_id, service_username
from server.credentials import services
from server.db import Database
from tests.conftest import Tenant


@dataclass(frozen=True)
class MqttLogin:
    """What an MQTT client presents in its CONNECT."""

    username: str
    password: str
    identifier: str


@dataclass(frozen=True)
class DeviceLogin(MqttLogin):
    tenant_id: uuid.UUID
    device_id: str
    credential_id: str

    def topic(self, kind: str) -> str:
        return f"pulse/{self.tenant_id}/{self.device_id}/{kind}"


@dataclass(frozen=True)
class ServiceLogin(MqttLogin):
    name: str


DeviceLoginFactory = Callable[..., Awaitable[DeviceLogin]]
ServiceLoginFactory = Callable[..., Awaitable[ServiceLogin]]


@pytest.fixture
def device_login(client: AsyncPulseClient, tenant: Tenant) -> DeviceLoginFactory:
    """`await device_login("D1")`: a new credential of device D1 of the test's
    tenant (the device is created on first use); `api=` and `tenant=` for
    another tenant's."""
    created: set[tuple[uuid.UUID, str]] = set()

    async def factory(
        device_id: str, *, api: AsyncPulseClient = client, tenant: Tenant = tenant
    ) -> DeviceLogin:
        if (tenant.tenant_id, device_id) not in created:
            await api.devices.create(device_id)
            created.add((tenant.tenant_id, device_id))
        cred = await api.devices.create_credential(device_id)
        return DeviceLogin(
            username=cred.username,
            password=cred.secret,
            identifier=device_client_id(tenant.tenant_id, device_id),
            tenant_id=tenant.tenant_id,
            device_id=device_id,
            credential_id=cred.credential_id,
        )

    return factory


@pytest.fixture
def service_login(db: Database) -> ServiceLoginFactory:
    """`await service_login()`: a freshly issued service credential under a
    unique name (issuing a shared name such as "evaluator" would replace a
    secret another test relies on); `identifier=` picks the client id."""

    async def factory(identifier: str | None = None) -> ServiceLogin:
        name = f"test-{uuid.uuid4().hex[:10]}"
        secret = await services.issue(db, name)
        username = service_username(name)
        return ServiceLogin(username, secret, identifier or username, name)

    return factory


async def closed_within(client: aiomqtt.Client, deadline_s: float) -> float:
    """Seconds until the broker closes `client`'s connection; fails past the deadline."""
    start = time.monotonic()
    with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
        async with asyncio.timeout(deadline_s):
            async for _ in client.messages:
                pass
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def lost(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
    """`async with client` for a client the broker will close: leaving does
    not fail on the closed connection (but errors of the body still do)."""
    await client.__aenter__()
    try:
        yield client
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)
