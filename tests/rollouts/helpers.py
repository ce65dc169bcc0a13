"""Reading a rollout's progress, and fleets of simulated devices for it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from pulse.device.v1 import rollouts_pb2
from pulse_client import AsyncPulseClient, struct_to_dict

from evaluator.simulator import SimulatedDevice
from tests.helpers import eventually

State = rollouts_pb2.Rollout.State
DeviceState = rollouts_pb2.RolloutDevice.State


async def device_states(client: AsyncPulseClient, rollout_id: str) -> dict[str, str]:
    """device_id -> state name, of every device of the rollout."""
    return {
        d.device_id: DeviceState.Name(d.state)
        async for d in client.rollouts.list_devices(rollout_id, page_size=1000)
    }


async def until_rollout(
    client: AsyncPulseClient,
    rollout_id: str,
    check: Callable[[rollouts_pb2.Rollout], bool],
    *,
    what: str,
    timeout: float = 20.0,  # noqa: ASYNC109
) -> rollouts_pb2.Rollout:
    found: list[rollouts_pb2.Rollout] = []

    async def holds() -> bool:
        found[:] = [await client.rollouts.get(rollout_id)]
        return check(found[0])

    await eventually(holds, timeout=timeout, what=what)
    return found[0]


async def desired(client: AsyncPulseClient, device_id: str) -> tuple[dict[str, Any], int]:
    twin = await client.twin.get(device_id)
    return struct_to_dict(twin.desired), twin.desired_version


@contextlib.asynccontextmanager
async def simulated(
    mqtt_url: str, tenant_id: uuid.UUID, device_ids: list[str], **options: Any
) -> AsyncIterator[dict[str, SimulatedDevice]]:
    """Devices that apply desired state and report it, for the block."""
    devices = {
        d: SimulatedDevice(mqtt_url, tenant_id, d, apply_delay_s=0.05, heartbeat_s=30, **options)
        for d in device_ids
    }
    try:
        for device in devices.values():
            await device.start()
        yield devices
    finally:
        for device in devices.values():
            await device.stop()
