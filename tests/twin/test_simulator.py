"""End to end: a simulated device on MQTT, the evaluator, the API."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiomqtt
from pulse.device.v1 import twin_pb2
from pulse_client import AsyncPulseClient, struct_to_dict

from evaluator.simulator import SimulatedDevice
from server import wire
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

    async def next_status() -> tuple[bytes, int | None]:
        return wire.parse_status(await next_of("status"))

    collector = asyncio.create_task(collect())
    try:
        await device.start()
        status, first = await next_status()
        assert status == b"online" and first is not None
        await device.drop_connection()  # no DISCONNECT: the broker sends the will
        # The will carries the seq of its session's online (docs/device-ordering.md).
        assert await next_status() == (b"lost", first)
        await device.start()
        status, second = await next_status()
        assert status == b"online" and second is not None and second > first
        # Heartbeats keep coming while connected, each with a newer seq.
        beats = [wire.activity_seq(await next_of("heartbeat")) for _ in range(2)]
        seqs = [seq for seq in beats if seq is not None]
        assert len(seqs) == 2 and second < seqs[0] < seqs[1]
        await device.stop()
        status, last = await next_status()
        assert status == b"offline" and last is not None and last > seqs[1]
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        await device.stop()
