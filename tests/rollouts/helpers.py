"""Reading a rollout's progress, and fleets of simulated devices for it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta
from typing import Any

from pulse.device.v1 import rollouts_pb2
from pulse_client import AsyncPulseClient, struct_to_dict

from evaluator.simulator import Behaviour, SimulatedDevice
from server.db import Database
from server.rollouts import store
from tests.helpers import eventually, unique_id

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
    mqtt_url: str,
    tenant_id: uuid.UUID,
    device_ids: list[str],
    behaviours: Mapping[str, Behaviour] | None = None,
) -> AsyncIterator[dict[str, SimulatedDevice]]:
    """Devices that apply desired state and report it (or, as `behaviours`
    says, fail or ignore it), for the block."""
    devices = {
        d: SimulatedDevice(
            mqtt_url,
            tenant_id,
            d,
            apply_delay_s=0.05,
            heartbeat_s=30,
            behaviour=(behaviours or {}).get(d, "apply"),
        )
        for d in device_ids
    }
    try:
        for device in devices.values():
            await device.start()
        yield devices
    finally:
        for device in devices.values():
            await device.stop()


async def create_rollout(db: Database, tenant_id: uuid.UUID, **fields: Any) -> str:
    """A rollout made by the store, as CreateRollout makes it: every active
    device, the patch {"fw": "2"} and no rate limit unless `fields` say
    otherwise. Its id."""
    values: dict[str, Any] = {
        "rollout_id": unique_id("rollout"),
        "description": "",
        "target_group_id": None,
        "target_filter": {},
        "patch": {"fw": "2"},
        "max_per_minute": 0,
        "canary_count": 0,
        "device_timeout": timedelta(minutes=15),
        "abort_threshold_percent": None,
        "abort_min_count": 1,
        "failure_path": "",
        "continuous": False,
        "created_by": "test",
    }
    values.update(fields)
    async with db.tenant(tenant_id) as con:
        record = await store.create(
            con, tenant_id, store.NewRollout(**values), stale_after=timedelta(minutes=5)
        )
    return record.rollout_id


async def writes(db: Database, tenant_id: uuid.UUID) -> dict[str, int]:
    """device_id -> desired version, of every device of the tenant."""
    async with db.tenant(tenant_id, readonly=True) as con:
        rows = await con.fetch("SELECT device_id, desired_version FROM device_state")
    return {r["device_id"]: r["desired_version"] for r in rows}


async def start_times(db: Database, tenant_id: uuid.UUID, rollout_id: str) -> list[float]:
    """Seconds from the rollout's creation to each device's write, in order."""
    async with db.tenant(tenant_id, readonly=True) as con:
        rows = await con.fetch(
            """
            SELECT extract(epoch FROM d.applied_at - r.created_at)::float8 AS t
            FROM rollout_devices d JOIN rollouts r USING (tenant_id, rollout_id)
            WHERE d.rollout_id = $1 AND d.applied_at IS NOT NULL
            ORDER BY d.applied_at
            """,
            rollout_id,
        )
    return [r["t"] for r in rows]
