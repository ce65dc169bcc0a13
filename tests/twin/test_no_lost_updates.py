"""Concurrent read-modify-write through modify_desired loses nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pulse_client import AsyncPulseClient, VersionConflict, struct_to_dict

from tests.conftest import ClientFactory, Tenant
from tests.twin.conftest import create_devices

WRITERS = 16
INCREMENTS = 200


def bump(doc: dict[str, Any]) -> None:
    doc["counter"] = doc.get("counter", 0) + 1


async def test_concurrent_increments_are_all_kept(
    client: AsyncPulseClient, tenant: Tenant, connect: ClientFactory
) -> None:
    await create_devices(client, "COUNTER")
    start = await client.twin.update_desired(
        "COUNTER", {"counter": 0, "other": "kept"}, expected_version=0
    )
    # Separate channels, as separate processes would have.
    writers = [await connect(tenant.token()) for _ in range(WRITERS)]

    async def writer(w: AsyncPulseClient) -> None:
        for _ in range(INCREMENTS):
            await w.twin.modify_desired("COUNTER", bump)

    async with asyncio.TaskGroup() as tasks:
        for w in writers:
            tasks.create_task(writer(w))

    twin = await client.twin.get("COUNTER")
    assert struct_to_dict(twin.desired) == {"counter": WRITERS * INCREMENTS, "other": "kept"}
    assert twin.desired_version == start.desired_version + WRITERS * INCREMENTS


async def test_blind_writes_would_lose_updates_and_stale_ones_are_refused(
    client: AsyncPulseClient,
) -> None:
    """The control experiment: two writers that read the same version; the
    second write is refused instead of silently overwriting the first."""
    await create_devices(client, "D1")
    read = await client.twin.get("D1")
    await client.twin.update_desired("D1", {"a": 1}, expected_version=read.desired_version)
    with pytest.raises(VersionConflict):
        await client.twin.update_desired("D1", {"b": 1}, expected_version=read.desired_version)
    assert struct_to_dict((await client.twin.get("D1")).desired) == {"a": 1}
