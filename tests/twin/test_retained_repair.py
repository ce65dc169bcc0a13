"""Desired state survives a broker that lost its retained messages: after a
restart without persistence, every device subscribing gets its current
desired version again; a broker that kept them gets nothing republished.

The broker here is an embedded one of the test's own (amqtt keeps nothing
on disk), restarted on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
from pulse_client import AsyncPulseClient

from bench.harness import free_port
from evaluator.broker import EmbeddedBroker
from evaluator.retained_repair import RetainedRepair
from evaluator.runtime import Evaluator
from evaluator.twin_publisher import TwinPublisher
from server import mqtt_url, wire
from server.db import Database, create_pool
from tests.conftest import Tenant
from tests.helpers import eventually, unique_id
from tests.twin.conftest import create_devices


class RestartableBroker:
    """An embedded broker that can be replaced by a fresh one on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._broker: EmbeddedBroker | None = None

    async def start(self) -> None:
        self._broker = EmbeddedBroker(port=self.port)
        await self._broker.start()

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None


@contextlib.asynccontextmanager
async def own_broker() -> AsyncIterator[RestartableBroker]:
    broker = RestartableBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


@contextlib.asynccontextmanager
async def running(task_of: Evaluator) -> AsyncIterator[None]:
    task = asyncio.create_task(task_of.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def retained_desired(url: str, topic: str) -> dict[str, Any]:
    """What a device subscribing now gets on its desired topic."""
    options = mqtt_url.parse(url).client_options()
    async with aiomqtt.Client(**options, identifier=unique_id("device")) as device:
        await device.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            async for message in device.messages:
                assert isinstance(message.payload, bytes)
                payload: dict[str, Any] = json.loads(message.payload)
                return payload
    raise AssertionError("no message")


async def outbox_empty(db: Database) -> bool:
    async with db.admin() as con:
        return not await con.fetchval("SELECT EXISTS (SELECT 1 FROM twin_outbox)")


async def test_desired_state_is_republished_after_the_broker_lost_it(
    client: AsyncPulseClient, tenant: Tenant, dsn: str
) -> None:
    devices = ["R1", "R2", "R3"]
    await create_devices(client, *devices)
    for n, device in enumerate(devices, start=1):
        for version in range(n):
            await client.twin.update_desired(device, {"n": version}, expected_version=version)
    db = Database(await create_pool(dsn, size=4))
    try:
        async with own_broker() as broker:
            address = mqtt_url.parse(broker.url)
            repair = RetainedRepair(db, address, client_id=unique_id("repair"), poll_s=0.01)
            evaluator = Evaluator(
                address,
                [TwinPublisher(db, poll_s=0.02), repair],
                client_id=unique_id("evaluator"),
                session_expiry_s=30,
            )
            async with running(evaluator):
                # A new broker has no marker: the first check repairs.
                await eventually(lambda: repair.repairs == 1 and repair.checked.is_set())
                await eventually(lambda: outbox_empty(db), what="the outbox drain")
                for n, device in enumerate(devices, start=1):
                    topic = wire.topic(tenant.tenant_id, device, "twin/desired")
                    assert (await retained_desired(broker.url, topic))["version"] == n

                await broker.stop()
                await broker.start()
                await eventually(lambda: repair.repairs == 2 and repair.checked.is_set())
                await eventually(lambda: outbox_empty(db), what="the outbox drain")
                for n, device in enumerate(devices, start=1):
                    topic = wire.topic(tenant.tenant_id, device, "twin/desired")
                    payload = await retained_desired(broker.url, topic)
                    assert payload == {"state": {"n": n - 1}, "version": n}
                assert repair.requeued >= 2 * len(devices)

                # The broker kept its retained messages: a new check finds
                # the marker and republishes nothing.
                again = RetainedRepair(db, address, client_id=unique_id("repair"))
                async with running(Evaluator(address, [again], client_id=unique_id("ev"))):
                    await eventually(again.checked.is_set)
                assert again.repairs == 0
    finally:
        await db.close()
