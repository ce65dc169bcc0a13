"""Desired writes committed while the broker restarts still reach their
devices, in version order.

Each committed write leaves a row in the twin outbox, deleted only once the
broker acknowledged the publication (evaluator/twin_publisher.py): writes
committed while Mosquitto is down wait in the outbox, and the drain
publishes them when it is back. The devices here keep persistent sessions
with a QoS 1 subscription, as real ones should, so a message published while
they are cut off is queued for them (with persistence, across the restart).

A device may skip intermediate versions (a drain publishes each device's
current document, once, however many writes queued it) and may see one
twice (at least once); it never sees an older version after a newer one, and
the last version it sees is the last one committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from server import wire
from server.db import Database
from server.twin import store
from tests.faults.conftest import EvaluatorFactory, MosquittoFactory, seed_fleet, wait_for

pytestmark = pytest.mark.timeout(90)

DEVICES = 5
WRITES = 20


@contextlib.asynccontextmanager
async def observing(port: int, topic: str, seen: dict[str, list[int]]) -> AsyncIterator[None]:
    """A persistent-session subscriber standing for the devices, reconnecting
    whenever the broker goes away."""

    async def observe() -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", port, identifier="faults-desired-devices", clean_session=False
                ) as client:
                    await client.subscribe(topic, qos=1)
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        _, device_id, _ = wire.parse(message.topic.value)
                        seen.setdefault(device_id, []).append(
                            json.loads(message.payload)["version"]
                        )
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    task = asyncio.create_task(observe())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_desired_writes_during_a_broker_restart_reach_devices_in_order(
    mosquitto_factory: MosquittoFactory, evaluators: EvaluatorFactory, dsn: str, db: Database
) -> None:
    broker = await mosquitto_factory(persistence=True)
    fleet = await seed_fleet(dsn, DEVICES, desired_version=0)
    evaluator = evaluators(broker.url, "faults-desired-restart")
    await evaluator.start()
    seen: dict[str, list[int]] = {}
    topic = f"pulse/{fleet.tenant_id}/+/twin/desired"

    async def write_round(version: int) -> None:
        async with db.tenant(fleet.tenant_id) as con:
            for device_id in fleet.device_ids:
                await store.write_desired(
                    con,
                    fleet.tenant_id,
                    device_id,
                    {"step": version},
                    expected_version=version - 1,
                )

    async with observing(broker.port, topic, seen):
        for version in range(1, WRITES + 1):
            await write_round(version)
            if version == WRITES // 2:
                await broker.stop()
            await asyncio.sleep(0.05)
        # The last half, the last version included, was committed while the
        # broker was down: only the outbox can bring it to the devices.
        await broker.start()
        await wait_for(
            lambda: all(seen.get(d, [0])[-1] == WRITES for d in fleet.device_ids),
            what="every device seeing the last committed version",
        )
    for device_id in fleet.device_ids:
        versions = seen[device_id]
        assert versions == sorted(versions), (device_id, versions)

    async def drained() -> bool:
        async with db.admin() as con:
            return not await con.fetchval(
                "SELECT EXISTS (SELECT 1 FROM twin_outbox WHERE tenant_id = $1)",
                fleet.tenant_id,
            )

    # Deleted once the broker acknowledged the last publication.
    await wait_for(drained, what="the outbox draining")
    assert evaluator.running
