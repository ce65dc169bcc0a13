"""Desired state to devices: published after commit, never before, and not
lost when publishing fails between commit and publication."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest
from pulse_client import AsyncPulseClient

from evaluator.twin_publisher import TwinPublisher
from server import wire
from server.db import Database
from server.twin import store
from tests.conftest import Tenant
from tests.helpers import eventually
from tests.twin.conftest import EvaluatorFactory, create_devices, mqtt_client


class Inbox:
    """Messages of one subscription, collected in the background."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.messages: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._task = asyncio.create_task(self._collect(client))

    async def _collect(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.messages.put_nowait(message)

    async def next(self, timeout: float = 10.0) -> tuple[dict[str, Any], bool]:  # noqa: ASYNC109
        message = await asyncio.wait_for(self.messages.get(), timeout)
        assert isinstance(message.payload, bytes)
        return json.loads(message.payload), message.retain

    async def nothing_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self.messages.empty()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def subscribed(mqtt_url: str, topic: str) -> AsyncIterator[Inbox]:
    async with mqtt_client(mqtt_url) as client:
        await client.subscribe(topic, qos=1)
        inbox = Inbox(client)
        try:
            yield inbox
        finally:
            await inbox.close()


async def queued(db: Database, tenant: Tenant) -> int:
    async with db.admin() as con:
        count = await con.fetchval(
            "SELECT count(*) FROM twin_outbox WHERE tenant_id = $1", tenant.tenant_id
        )
    assert isinstance(count, int)
    return count


async def test_desired_is_published_after_commit_and_never_before(
    client: AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
) -> None:
    running = await start_evaluator()
    await create_devices(client, "D1")
    topic = wire.topic(tenant.tenant_id, "D1", "twin/desired")
    async with subscribed(mqtt_url, topic) as inbox:
        async with db.tenant(tenant.tenant_id) as con:
            await store.write_desired(
                con, tenant.tenant_id, "D1", {"led": "on"}, expected_version=0
            )
            # Written but not committed: the publisher polls every 20 ms
            # and must not announce it.
            await inbox.nothing_for(0.5)
        assert await inbox.next() == ({"state": {"led": "on"}, "version": 1}, False)
        # A rolled-back write and a refused one publish nothing.
        with pytest.raises(RuntimeError):
            async with db.tenant(tenant.tenant_id) as con:
                await store.write_desired(
                    con, tenant.tenant_id, "D1", {"led": "blink"}, expected_version=1
                )
                raise RuntimeError("abort")
        with pytest.raises(Exception, match="VERSION_MISMATCH"):
            await client.twin.update_desired("D1", {"led": "off"}, expected_version=0)
        await inbox.nothing_for(0.3)
        # Later writes arrive in version order (several may collapse into one).
        for version in range(1, 6):
            await client.twin.update_desired("D1", {"n": version}, expected_version=version)
        seen: list[int] = []
        while not seen or seen[-1] < 6:
            payload, _ = await inbox.next()
            seen.append(payload["version"])
        assert seen == sorted(seen) and payload["state"] == {"n": 5}

    async def drained() -> bool:
        return await queued(db, tenant) == 0

    await eventually(drained, what="the outbox drain")
    assert running.publisher.published >= 2


class BrokenPublisher:
    """A broker connection that dies when the first message is published."""

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        raise aiomqtt.MqttError("connection lost")


async def test_a_publication_lost_after_commit_happens_on_restart(
    client: AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
    retained_cleanup: None,
) -> None:
    await create_devices(client, "D1")
    async with db.admin() as con:
        await con.execute("DELETE FROM twin_outbox")  # other tests' leftovers
    # Committed while no evaluator runs...
    await client.twin.update_desired("D1", {"mode": "eco"}, expected_version=0)
    await client.twin.update_desired("D1", {"mode": "away"}, expected_version=1)
    assert await queued(db, tenant) == 2
    # ...and the publisher dies while publishing: nothing is lost.
    with pytest.raises(aiomqtt.MqttError):
        await TwinPublisher(db).drain_once(BrokenPublisher())
    assert await queued(db, tenant) == 2

    await start_evaluator()
    topic = wire.topic(tenant.tenant_id, "D1", "twin/desired")

    async def drained() -> bool:
        return await queued(db, tenant) == 0

    await eventually(drained, what="the outbox drain")
    # A device connecting now gets the latest desired state, retained.
    async with subscribed(mqtt_url, topic) as inbox:
        assert await inbox.next() == ({"state": {"mode": "away"}, "version": 2}, True)
