"""End to end: a simulated device on MQTT, the evaluator, the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import pytest
from pulse.device.v1 import twin_pb2
from pulse_client import AsyncPulseClient, struct_to_dict

from evaluator.simulator import Behaviour, SimulatedDevice, running_fleet
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


# -- devices told to misbehave, for testing rollouts ------------------------------


@contextlib.asynccontextmanager
async def reports_of(
    mqtt: aiomqtt.Client, device: SimulatedDevice
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every report `device` publishes while the context lasts, as JSON, in
    the order sent (one connection's messages arrive in order)."""
    topic = device.twin_topic("twin/reported")
    await mqtt.subscribe(topic, qos=1)
    seen: list[dict[str, Any]] = []

    async def collect() -> None:
        async for message in mqtt.messages:
            if message.topic.value == topic and isinstance(message.payload, bytes):
                seen.append(json.loads(message.payload))

    collector = asyncio.create_task(collect())
    try:
        yield seen
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector


async def reported_version_is(client: AsyncPulseClient, device_id: str, version: int) -> None:
    async def reached() -> bool:
        return (await client.twin.get(device_id)).reported_version == version

    await eventually(reached, what=f"{device_id}'s report of version {version}")


async def test_an_ignoring_device_never_reports_desired_state(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt: aiomqtt.Client,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
) -> None:
    await start_evaluator()
    await create_devices(client, "SIM-3")
    # No delay: had it applied version 1, its report would follow at once.
    device = SimulatedDevice(
        mqtt_url, tenant.tenant_id, "SIM-3", apply_delay_s=0, behaviour="ignore"
    )
    async with reports_of(mqtt, device) as reports:
        await device.start()
        try:
            await client.twin.update_desired("SIM-3", {"mode": "eco"}, expected_version=0)
            await eventually(lambda: device.received_version == 1, what="desired version 1")
            assert (device.applied_version, device.state) == (0, {})
            twin = await client.twin.get("SIM-3")
            assert (twin.desired_version, twin.reported_version) == (1, 0)
            assert twin.sync_status != twin_pb2.Twin.SYNCED

            # Told to apply, it reports the next version; a report of version
            # 1 would have come before that one.
            device.behaviour = "apply"
            await client.twin.patch_desired("SIM-3", {"mode": "away"}, expected_version=1)
            await device.wait_for_version(2)
            await eventually(lambda: len(reports) > 0, what="the device's report")
            assert [r["desired_version"] for r in reports] == [2]
            assert reports[0]["state"] == {"mode": "away"}
            await reported_version_is(client, "SIM-3", 2)
        finally:
            await device.stop()


async def test_a_failing_device_acknowledges_the_version_and_reports_an_error(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
) -> None:
    await start_evaluator()
    await create_devices(client, "SIM-4")
    device = SimulatedDevice(
        mqtt_url, tenant.tenant_id, "SIM-4", apply_delay_s=0.1, behaviour="fail"
    )
    await device.start()
    try:
        desired: dict[str, Any] = {"firmware": {"version": "2.0"}, "mode": "eco"}
        await client.twin.update_desired("SIM-4", desired, expected_version=0)
        await device.wait_for_version(1)
        await reported_version_is(client, "SIM-4", 1)
        twin = await client.twin.get("SIM-4")
        failed = {"firmware": {"error": "simulated failure"}}
        assert struct_to_dict(twin.reported) == failed
        assert struct_to_dict(twin.desired) == desired and twin.desired_version == 1
        assert twin.sync_status != twin_pb2.Twin.SYNCED
        assert device.state == failed
    finally:
        await device.stop()


async def test_a_running_device_behaves_anew_from_the_next_desired_write(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
) -> None:
    await start_evaluator()
    await create_devices(client, "SIM-5")
    device = SimulatedDevice(mqtt_url, tenant.tenant_id, "SIM-5", apply_delay_s=0.1)
    await device.start()
    try:
        first: dict[str, Any] = {"firmware": {"version": "1.0"}, "mode": "eco"}
        await client.twin.update_desired("SIM-5", first, expected_version=0)
        await device.wait_for_version(1)
        assert device.state == first

        device.behaviour = "fail"
        device.fail_path, device.fail_message = "ota.last_error", "checksum mismatch"
        await client.twin.patch_desired(
            "SIM-5", {"firmware": {"version": "2.0"}}, expected_version=1
        )
        await device.wait_for_version(2)
        await reported_version_is(client, "SIM-5", 2)
        # What it ran with before, unchanged, and the error where it was told.
        failed = {**first, "ota": {"last_error": "checksum mismatch"}}
        twin = await client.twin.get("SIM-5")
        assert struct_to_dict(twin.reported) == failed
        assert twin.sync_status != twin_pb2.Twin.SYNCED

        device.behaviour = "apply"
        await client.twin.patch_desired(
            "SIM-5", {"firmware": {"version": "2.1"}}, expected_version=2
        )
        await device.wait_for_version(3)

        async def synced() -> bool:
            twin = await client.twin.get("SIM-5")
            return twin.sync_status == twin_pb2.Twin.SYNCED and twin.reported_version == 3

        await eventually(synced, what="convergence on version 3")
        assert device.state == {"firmware": {"version": "2.1"}, "mode": "eco"}
    finally:
        await device.stop()


async def test_a_failing_upstream_device_reports_in_upstreams_shape(
    tenant: Tenant, mqtt: aiomqtt.Client, mqtt_url: str
) -> None:
    device = SimulatedDevice(
        mqtt_url,
        tenant.tenant_id,
        "SIM-6",
        apply_delay_s=0,
        dialect=wire.Dialect.UPSTREAM,
        behaviour="fail",
        fail_path=r"last\.error",  # as a rollout's failure_path: one key
    )
    async with reports_of(mqtt, device) as reports:
        await device.start()
        try:
            desired = wire.upstream_desired({"fan": 2}, 1, datetime.now(UTC))
            await mqtt.publish(device.twin_topic("twin/desired"), desired, qos=1)
            await device.wait_for_version(1)
            await eventually(lambda: len(reports) > 0, what="the device's report")
            assert reports == [{"reported": {"last.error": "simulated failure"}, "version": 1}]
        finally:
            await device.stop()


async def test_a_fleet_gives_each_device_its_behaviour(
    tenant: Tenant, mqtt_url: str, retained_cleanup: None
) -> None:
    ids = ["SIM-7", "SIM-8", "SIM-9"]
    behaviours: dict[str, Behaviour] = {"SIM-8": "fail", "SIM-9": "ignore"}
    async with running_fleet(mqtt_url, tenant.tenant_id, ids, behaviours=behaviours) as fleet:
        assert [(d.device_id, d.behaviour) for d in fleet] == [
            ("SIM-7", "apply"),
            ("SIM-8", "fail"),
            ("SIM-9", "ignore"),
        ]
        assert all(d.connected.is_set() for d in fleet)
    # A misspelt id would leave the device applying: refused instead.
    with pytest.raises(ValueError, match="SIM-10"):
        async with running_fleet(mqtt_url, tenant.tenant_id, ids, behaviours={"SIM-10": "fail"}):
            pytest.fail("the fleet started")
    with pytest.raises(ValueError, match="crash"):
        SimulatedDevice(mqtt_url, tenant.tenant_id, "SIM-7", behaviour="crash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="end with a dot"):
        SimulatedDevice(mqtt_url, tenant.tenant_id, "SIM-7", fail_path="firmware.")
