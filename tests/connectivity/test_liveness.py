"""Liveness end to end: simulated devices on a real broker, the evaluator's
liveness handler, PostgreSQL, and the API reading what it wrote."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import aiomqtt
import pulse_client as pc
from pulse.device.v1 import connectivity_pb2 as cp
from pulse.device.v1 import status_pb2 as st

from evaluator.simulator import SimulatedDevice
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.helpers import clear_retained, eventually

from .conftest import Collector, EvaluatorFactory

Step = tuple[int, int, int, int]  # event type, previous status, status, trigger


def _steps(events: Sequence[cp.ConnectionEvent]) -> list[Step]:
    return [(e.event_type, e.previous_status, e.status, e.trigger) for e in events]


class Devices:
    """Starts simulated devices without waiting on SimulatedDevice.start(),
    which returns only when its whole timeout has passed (it waits for the
    device's run task as well as for the connection): a test waits for the
    connection itself and stops what is left at the end."""

    def __init__(self) -> None:
        self._starts: list[asyncio.Task[None]] = []

    async def connect(self, device: SimulatedDevice) -> None:
        device.connected.clear()
        self._starts.append(asyncio.create_task(device.start()))
        await asyncio.wait_for(device.connected.wait(), 10)

    async def close(self) -> None:
        for task in self._starts:
            task.cancel()
        await asyncio.gather(*self._starts, return_exceptions=True)


@contextlib.asynccontextmanager
async def heartbeats(*devices: SimulatedDevice, every_s: float = 0.2) -> AsyncIterator[None]:
    """Keep devices talking while a step is checked, so a slow check cannot
    let them go stale before the next step (activity on an ONLINE device
    records nothing)."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(every_s)
            for device in devices:
                with contextlib.suppress(RuntimeError, aiomqtt.MqttError):
                    await device.report()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _status(client: pc.AsyncPulseClient, device_id: str) -> int:
    return (await client.devices.get(device_id)).connectivity_status


async def test_a_device_online_silent_back_offline_and_dropped(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    make_tenant: TenantFactory,
    connect: ClientFactory,
    start_evaluator: EvaluatorFactory,
    mqtt_url: str,
) -> None:
    await client.devices.create("SIM-1")
    other = await make_tenant()
    other_client = await connect(other.token())
    await other_client.devices.create("SIM-1")  # same id, another tenant
    watch = Collector.start(client.connectivity.watch())
    theirs = Collector.start(other_client.connectivity.watch())
    await watch.wait_ready()
    await theirs.wait_ready()
    await start_evaluator(stale_after_s=1.0, sweep_interval_s=0.05)
    # One heartbeat when it connects, then silence.
    device = SimulatedDevice(mqtt_url, tenant.tenant_id, "SIM-1", heartbeat_s=3600)
    starter = Devices()
    try:
        await starter.connect(device)
        await watch.wait_events(1)
        assert await _status(client, "SIM-1") == st.ONLINE

        await watch.wait_events(2)  # the sweep, once the threshold has passed
        assert await _status(client, "SIM-1") == st.STALE

        await device.report()  # any message is a sign of life
        async with heartbeats(device):  # however slow this machine is today
            await watch.wait_events(3)
            assert await _status(client, "SIM-1") == st.ONLINE
        await device.stop()
        await watch.wait_events(4)
        assert await _status(client, "SIM-1") == st.OFFLINE

        async with heartbeats(device):
            await starter.connect(device)
            await watch.wait_events(5)
        await device.drop_connection()
        await watch.wait_events(6)
        assert await _status(client, "SIM-1") == st.OFFLINE
    finally:
        await starter.close()
        await device.stop()
        await clear_retained(mqtt_url, f"pulse/{tenant.tenant_id}")

    expected = [
        (cp.CONNECTED, st.UNKNOWN, st.ONLINE, cp.STATUS_ONLINE),
        (cp.CONNECTION_LOST, st.ONLINE, st.STALE, cp.HEARTBEAT_TIMEOUT),
        (cp.CONNECTED, st.STALE, st.ONLINE, cp.HEARTBEAT_RESUMED),
        (cp.DISCONNECTED, st.ONLINE, st.OFFLINE, cp.STATUS_OFFLINE),
        (cp.CONNECTED, st.OFFLINE, st.ONLINE, cp.STATUS_ONLINE),
        (cp.CONNECTION_LOST, st.ONLINE, st.OFFLINE, cp.LAST_WILL),
    ]
    assert _steps(watch.events) == expected
    listed = [e async for e in client.connectivity.list("SIM-1")]
    assert _steps(listed[::-1]) == expected
    assert watch.events[5].details["last_seen_at"]
    assert theirs.events == []
    await watch.stop()
    await theirs.stop()


async def test_two_evaluators_at_once_record_each_transition_once(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    start_evaluator: EvaluatorFactory,
    mqtt_url: str,
) -> None:
    devices = [f"TWIN-EVAL-{n}" for n in range(5)]
    for device_id in devices:
        await client.devices.create(device_id)
    # Both see every message (no shared subscription) and both sweep.
    first = await start_evaluator(stale_after_s=1.0, sweep_interval_s=0.02)
    second = await start_evaluator(stale_after_s=1.0, sweep_interval_s=0.02)
    sims = [SimulatedDevice(mqtt_url, tenant.tenant_id, d, heartbeat_s=3600) for d in devices]
    starter = Devices()
    try:
        for sim in sims:
            await starter.connect(sim)

        async def all_stale() -> bool:
            return all([await _status(client, d) == st.STALE for d in devices])

        await eventually(all_stale, what="every device going stale")
        for sim in sims:
            await sim.report()
        async with heartbeats(*sims):
            await eventually(
                lambda: _count_online(client, devices, len(devices)), what="every device back"
            )
        for sim in sims:
            await sim.stop()

        async def all_offline() -> bool:
            return all([await _status(client, d) == st.OFFLINE for d in devices])

        await eventually(all_offline, what="every device offline")
        # Both evaluators have had time to flush their copy of every message.
        await asyncio.sleep(0.3)
        for running in (first, second):
            await running.liveness.flush()
    finally:
        await starter.close()
        for sim in sims:
            await sim.stop()
        await clear_retained(mqtt_url, f"pulse/{tenant.tenant_id}")

    for device_id in devices:
        events = [e async for e in client.connectivity.list(device_id)]
        assert [e.event_type for e in reversed(events)] == [
            cp.CONNECTED,
            cp.CONNECTION_LOST,
            cp.CONNECTED,
            cp.DISCONNECTED,
        ], device_id
    # Both really took part: each received every device message.
    assert first.evaluator.received > 0 and second.evaluator.received > 0


async def _count_online(client: pc.AsyncPulseClient, devices: Sequence[str], want: int) -> bool:
    statuses = [await _status(client, d) for d in devices]
    return statuses.count(st.ONLINE) == want
