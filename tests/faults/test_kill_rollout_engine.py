"""An evaluator killed with SIGKILL mid-rollout: its rollout engine's
unfinished transaction rolls back whole, so after a restart every device
is written exactly once and none is skipped.

A device's desired version says how often it was written (each write adds
one); the rollout's rows say which devices the engine believes it wrote.
Both must agree, for every device, across the kill.
"""

from __future__ import annotations

import uuid

import pytest

from server.db import Database
from tests.conftest import FleetFactory
from tests.faults.conftest import EvaluatorFactory, Mosquitto, wait_for
from tests.rollouts.helpers import create_rollout, writes

pytestmark = pytest.mark.timeout(120)

DEVICES = 5_000


async def _applied(db: Database, tenant_id: uuid.UUID, rollout_id: str) -> dict[str, int]:
    """device_id -> the version written, of the devices the rollout wrote."""
    async with db.tenant(tenant_id, readonly=True) as con:
        rows = await con.fetch(
            "SELECT device_id, desired_version FROM rollout_devices "
            "WHERE rollout_id = $1 AND state = 'APPLIED'",
            rollout_id,
        )
    return {r["device_id"]: r["desired_version"] for r in rows}


async def test_an_engine_killed_mid_rollout_writes_no_device_twice_and_skips_none(
    mosquitto: Mosquitto,
    evaluators: EvaluatorFactory,
    db: Database,
    seed_fleet_tenant: FleetFactory,
) -> None:
    device_ids = [f"KILL-{n:04d}" for n in range(DEVICES)]
    tenant_id = await seed_fleet_tenant(device_ids, desired_version=1)
    rollout_id = await create_rollout(db, tenant_id)
    evaluator = evaluators(mosquitto.url, "rollout-kill")
    await evaluator.start()

    async def underway() -> bool:
        return len(await _applied(db, tenant_id, rollout_id)) >= DEVICES // 10

    await wait_for(underway, what="a tenth of the fleet written")
    await evaluator.kill()
    at_kill = await _applied(db, tenant_id, rollout_id)
    assert len(at_kill) < DEVICES, "the rollout finished before the kill"
    # What committed before the kill is consistent already.
    written = await writes(db, tenant_id)
    assert {d for d, v in written.items() if v == 2} == set(at_kill)

    await evaluator.start()

    async def finished() -> bool:
        return len(await _applied(db, tenant_id, rollout_id)) == DEVICES

    await wait_for(finished, what="every device written after the restart", timeout=90)
    assert await writes(db, tenant_id) == dict.fromkeys(device_ids, 2)
    assert await _applied(db, tenant_id, rollout_id) == dict.fromkeys(device_ids, 2)
