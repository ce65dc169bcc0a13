"""Membership events under concurrent writers: devices flip their status and
report their twin while two evaluators, both subscribed to every device,
store what they receive at the same time. For each device and group the
events must alternate ENTERED / LEFT, and end in the membership a fresh
ListGroupMembers shows."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import aiomqtt
import pulse_client as pc
import pytest
from pulse.device.v1 import groups_pb2, status_pb2

from evaluator.liveness import Liveness
from evaluator.runtime import Evaluator
from evaluator.twin_ingest import TwinIngest
from server import wire
from server.db import Database, create_pool
from server.mqtt_url import parse as parse_broker
from tests.conftest import Tenant
from tests.groups.helpers import evaluated_members
from tests.helpers import eventually, unique_id
from tests.twin.conftest import mqtt_client

pytestmark = pytest.mark.timeout(120)

DEVICES = 20
MESSAGES = 60  # per device
Message = groups_pb2.WatchGroupMembershipResponse


@pytest.fixture
async def two_evaluators(dsn: str, mqtt_url: str) -> AsyncIterator[None]:
    """Two evaluators (liveness and twin ingest), each receiving every message."""
    pools = [Database(await create_pool(dsn, size=4)) for _ in range(2)]
    client_ids = [unique_id("membership-evaluator") for _ in range(2)]
    evaluators = [
        Evaluator(
            mqtt_url,
            [Liveness(db, stale_after_s=60, flush_s=0.02, flap_hold_s=0), TwinIngest(db)],
            client_id=cid,
            session_expiry_s=30,
        )
        for db, cid in zip(pools, client_ids, strict=True)
    ]
    tasks = [asyncio.create_task(e.run()) for e in evaluators]
    try:
        for evaluator in evaluators:
            await asyncio.wait_for(evaluator.connected.wait(), 10)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for db in pools:
            await db.close()
        for cid in client_ids:
            options = parse_broker(mqtt_url).client_options()
            async with aiomqtt.Client(**options, identifier=cid, clean_session=True):
                pass


async def _device(
    mqtt: aiomqtt.Client, tenant: Tenant, device_id: str, seed: int
) -> dict[str, object]:
    """Publish MESSAGES status flips and reports in order; return the last of each."""
    rng = random.Random(seed)
    last: dict[str, object] = {}
    for seq in range(1, MESSAGES + 1):
        if rng.random() < 0.5:
            word = rng.choice([b"online", b"offline"])
            topic = wire.topic(tenant.tenant_id, device_id, "status")
            await mqtt.publish(topic, wire.status_payload(word, seq=seq), qos=1)
            last["status"] = word.decode().upper()
        else:
            state = {"temp": rng.randrange(0, 100)}
            payload = json.dumps({"state": state, "desired_version": 0, "seq": seq}).encode()
            await mqtt.publish(
                wire.topic(tenant.tenant_id, device_id, "twin/reported"), payload, qos=1
            )
            last["reported"] = state
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() / 50)
    return last


async def test_events_alternate_and_end_at_the_listed_members(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    two_evaluators: None,
) -> None:
    device_ids = [f"C-{i:02}" for i in range(DEVICES)]
    for device_id in device_ids:
        await client.devices.create(device_id)
    hot: dict[str, object] = {
        "twin_conditions": [
            {"document": "REPORTED", "path": "temp", "operator": "GREATER", "values": [50]}
        ]
    }
    groups: dict[str, dict[str, object]] = {
        "online": {"statuses": ["ONLINE"]},
        "hot": hot,
        "online-hot": {**hot, "statuses": ["ONLINE"]},
    }
    for group_id, query in groups.items():
        await client.groups.create_dynamic(group_id, query, group_id=group_id)
    # From the members at the start (none: new devices are UNKNOWN, with no
    # report), every change.
    watches = {g: client.groups.watch_membership(g) for g in groups}
    received: dict[str, list[Message]] = {g: [] for g in groups}

    async def read(group_id: str) -> None:
        async for message in watches[group_id]:
            received[group_id].append(message)

    readers = [asyncio.create_task(read(g)) for g in groups]
    try:
        async with mqtt_client(mqtt_url) as mqtt:
            lasts = await asyncio.gather(
                *(_device(mqtt, tenant, d, seed) for seed, d in enumerate(device_ids))
            )

        async def stored() -> bool:
            for device_id, last in zip(device_ids, lasts, strict=True):
                device = await client.devices.get(device_id)
                twin = await client.twin.get(device_id)
                status = status_pb2.ConnectivityStatus.Name(device.connectivity_status)
                if "status" in last and status != last["status"]:
                    return False
                if "reported" in last and pc.struct_to_dict(twin.reported) != last["reported"]:
                    return False
            return True

        await eventually(stored, timeout=60, what="every device's last message stored")

        async def settled() -> bool:
            for group_id in groups:
                listed = {m.device_id async for m in client.groups.members(group_id)}
                evaluated = await evaluated_members(client, group_id)
                if not _members(received[group_id]) == listed == evaluated:
                    return False
            return True

        await eventually(settled, timeout=30, what="the events adding up to ListGroupMembers")
    finally:
        for watch in watches.values():
            watch.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    for group_id, messages in received.items():
        per_device: dict[str, list[str]] = {}
        for m in messages:
            per_device.setdefault(m.device_id, []).append(Message.EventType.Name(m.event_type))
        for device_id, types in per_device.items():
            expected = ["ENTERED", "LEFT"] * len(types)
            assert types == expected[: len(types)], (group_id, device_id, types)
    # The traffic did move devices in and out, more than once.
    assert sum(len(m) for m in received.values()) > DEVICES


def _members(messages: list[Message]) -> set[str]:
    members: set[str] = set()
    for m in messages:
        if m.event_type == Message.ENTERED:
            members.add(m.device_id)
        else:
            members.discard(m.device_id)
    return members
