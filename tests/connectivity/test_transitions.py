"""The evaluator's statements: one event per transition, also when two
evaluators apply the same signals and sweep the same fleet at once."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pulse_client as pc
import pytest
from pulse.device.v1 import connectivity_pb2 as cp
from pulse.device.v1 import status_pb2 as st

from evaluator.liveness import Liveness, plan_rounds, read
from server import wire
from server.connectivity.model import Signal
from server.connectivity.transitions import DeviceSignal, Transition, apply_signals, fleet, sweep
from server.db import Database, create_pool
from tests.conftest import Tenant

from .conftest import create_devices


@pytest.fixture
async def second_pool(dsn: str) -> AsyncIterator[Database]:
    """Another evaluator process's pool."""
    database = Database(await create_pool(dsn, size=2))
    yield database
    await database.close()


def _message(kind: str, payload: bytes = b"", *, retain: bool = False) -> wire.DeviceMessage:
    return wire.DeviceMessage(uuid.uuid4(), "D", kind, payload, datetime.now(UTC), retain=retain)


def test_messages_become_signals() -> None:
    assert read(_message("heartbeat"))[0] is Signal.ACTIVITY
    assert read(_message("telemetry", b"online"))[0] is Signal.ACTIVITY
    assert read(_message("status", b"online"))[0] is Signal.ONLINE
    assert read(_message("status", b" OFFLINE\n"))[0] is Signal.OFFLINE
    assert read(_message("status", b"lost"))[0] is Signal.WILL
    assert read(_message("status", b""))[0] is Signal.WILL


def test_rounds_keep_each_devices_order_and_merge_runs_of_activity() -> None:
    t0 = datetime.now(UTC)
    tenant = uuid.uuid4()

    def s(device: str, signal: Signal, seconds: int) -> DeviceSignal:
        return DeviceSignal(tenant, device, signal, t0 + timedelta(seconds=seconds))

    rounds = plan_rounds(
        [
            s("A", Signal.ACTIVITY, 1),
            s("B", Signal.ONLINE, 1),
            s("A", Signal.ACTIVITY, 3),
            s("A", Signal.OFFLINE, 4),
            s("B", Signal.ACTIVITY, 5),
            s("A", Signal.ACTIVITY, 6),
            s("A", Signal.ACTIVITY, 7),
        ]
    )
    # Each device's net effect: A's last status signal and the activity that
    # ends it; B's online, carrying the later activity's time (activity
    # after `online` changes nothing else).
    assert rounds == [
        [
            s("A", Signal.OFFLINE, 4),
            replace(s("B", Signal.ONLINE, 1), seen=t0 + timedelta(seconds=5)),
        ],
        [s("A", Signal.ACTIVITY, 7)],
    ]


async def test_retained_replays_are_not_signals(fleet_db: Database) -> None:
    liveness = Liveness(fleet_db)
    await liveness.handle(_message("status", b"online", retain=True))
    assert await liveness.flush() == []


SEQUENCE = [Signal.ONLINE, Signal.ACTIVITY, Signal.OFFLINE, Signal.OFFLINE, Signal.ACTIVITY]
SEQUENCE += [Signal.WILL, Signal.ONLINE, Signal.ONLINE, Signal.WILL, Signal.ACTIVITY]
# UNKNOWN->ONLINE, ->OFFLINE, ->ONLINE, ->OFFLINE, ->ONLINE, ->OFFLINE, ->ONLINE
EXPECTED_PER_DEVICE = 7


async def test_two_evaluators_applying_the_same_signals_insert_each_event_once(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, second_pool: Database
) -> None:
    """Two evaluators that both receive every message apply each one at about
    the same time, racing for the same rows."""
    devices = [f"DUO-{n:02d}" for n in range(40)]
    await create_devices(client, devices)

    async def apply(db: Database, signal: Signal, now: datetime) -> list[Transition]:
        async with fleet(db) as con:
            return await apply_signals(
                con, [DeviceSignal(tenant.tenant_id, d, signal, now) for d in devices]
            )

    inserted: list[Transition] = []
    for signal in SEQUENCE:
        now = datetime.now(UTC)
        first, second = await asyncio.gather(
            apply(fleet_db, signal, now), apply(second_pool, signal, now)
        )
        inserted += first + second
    assert len(inserted) == EXPECTED_PER_DEVICE * len(devices)
    for device_id in devices:
        events = [e async for e in client.connectivity.list(device_id, page_size=100)]
        assert len(events) == EXPECTED_PER_DEVICE
        # Each event starts where the previous one ended: no transition twice.
        chain = [(e.previous_status, e.status) for e in reversed(events)]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chain))
    assert (await client.devices.get(devices[0])).connectivity_status == st.ONLINE


async def test_two_sweeps_at_once_mark_each_device_stale_once(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, second_pool: Database
) -> None:
    devices = [f"SWEEP-{n:03d}" for n in range(200)]
    await create_devices(client, devices)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    async with fleet(fleet_db) as con:
        await apply_signals(
            con, [DeviceSignal(tenant.tenant_id, d, Signal.ACTIVITY, long_ago) for d in devices]
        )

    async def sweeper(db: Database) -> int:
        async with fleet(db) as con:
            return await sweep(con, now=datetime.now(UTC), stale_after_s=30)

    counts = await asyncio.gather(sweeper(fleet_db), sweeper(second_pool))
    # Other tests' devices in this database may go stale too; ours exactly once.
    assert sum(counts) >= len(devices)
    stale = [e async for e in client.connectivity.list(page_size=1000) if e.status == st.STALE]
    assert sorted(e.device_id for e in stale) == devices
    assert {e.trigger for e in stale} == {cp.HEARTBEAT_TIMEOUT}
