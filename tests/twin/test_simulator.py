"""End to end: a simulated device on MQTT, the evaluator, the API."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiomqtt
from pulse.device.v1 import twin_pb2
from pulse_client import AsyncPulseClient, struct_to_dict

from evaluator.simulator import SimulatedDevice
from tests.conftest import Tenant
from tests.helpers import eventually
from tests.twin.conftest import EvaluatorFactory, create_devices


async def test_a_device_converges_after_each_desired_change(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
) -> None:
    await start_evaluator()
    await create_devices(client, "SIM-1")
    device = SimulatedDevice(mqtt_url, tenant.tenant_id, "SIM-1", apply_delay_s=0.1)
    await device.start()
    try:
        async with client.twin.watch("SIM-1") as stream:
            await anext(stream)
            desired: dict[str, Any] = {
                "mode": "eco",
                "telemetry": {"interval_s": 5, "fields": ["t", "rh"]},
            }
            await client.twin.update_desired("SIM-1", desired, expected_version=0)
            twin = await anext(stream)
            assert twin.sync_status != twin_pb2.Twin.SYNCED  # the device is behind
            async with asyncio.timeout(10):
                while twin.sync_status != twin_pb2.Twin.SYNCED:
                    twin = await anext(stream)
            assert twin.structured_delta.in_sync and not twin.delta.fields
            assert struct_to_dict(twin.reported) == desired
            assert twin.reported_version == twin.desired_version == 1

        await client.twin.patch_desired(
            "SIM-1", {"mode": "away", "telemetry": {"fields": None}}, expected_version=1
        )
        await device.wait_for_version(2)

        async def synced() -> bool:
            twin = await client.twin.get("SIM-1")
            return twin.sync_status == twin_pb2.Twin.SYNCED and twin.reported_version == 2

        await eventually(synced, what="convergence on version 2")
        assert device.state == {"mode": "away", "telemetry": {"interval_s": 5}}
    finally:
        await device.stop()


async def test_status_messages_and_the_last_will(
    tenant: Tenant, mqtt: aiomqtt.Client, mqtt_url: str
) -> None:
    device = SimulatedDevice(mqtt_url, tenant.tenant_id, "SIM-2", heartbeat_s=0.1)
    await mqtt.subscribe(device.topic("status"), qos=1)
    await mqtt.subscribe(device.topic("heartbeat"), qos=1)
    seen: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def collect() -> None:
        async for message in mqtt.messages:
            assert isinstance(message.payload, bytes)
            seen.put_nowait((message.topic.value.rsplit("/", 1)[1], message.payload))

    async def next_of(wanted: str) -> bytes:
        async with asyncio.timeout(10):
            while True:
                kind, payload = await seen.get()
                if kind == wanted:
                    return payload

    async def next_status() -> bytes:
        return await next_of("status")

    collector = asyncio.create_task(collect())
    try:
        await device.start()
        assert await next_status() == b"online"
        await device.drop_connection()  # no DISCONNECT: the broker sends the will
        assert await next_status() == b"lost"
        await device.start()
        assert await next_status() == b"online"
        # Heartbeats keep coming while connected.
        for _ in range(2):
            assert b"uptime_s" in await next_of("heartbeat")
        await device.stop()
        assert await next_status() == b"offline"
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        await device.stop()
