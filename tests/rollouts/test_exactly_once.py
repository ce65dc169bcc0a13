"""Several engines at once: every device written once, and the rate shared.

Devices here never acknowledge: what is checked is the engines' writes,
read from the database (a second write of a device would raise its desired
version to 2)."""

from __future__ import annotations

from server.db import Database
from server.rollouts import rules, store
from tests.conftest import FleetFactory
from tests.helpers import eventually
from tests.rollouts.conftest import EngineFactory
from tests.rollouts.helpers import create_rollout, start_times, writes


async def test_two_engines_write_every_device_exactly_once(
    db: Database, start_engine: EngineFactory, seed_fleet_tenant: FleetFactory
) -> None:
    ids = [f"E-{n:05d}" for n in range(3000)]
    tenant_id = await seed_fleet_tenant(ids)
    await start_engine()
    await start_engine()
    rollout_id = await create_rollout(db, tenant_id)

    async def all_written() -> bool:
        return len(await start_times(db, tenant_id, rollout_id)) == len(ids)

    await eventually(all_written, timeout=60, what="every device written")
    assert await writes(db, tenant_id) == dict.fromkeys(ids, 1)
    async with db.admin() as con:
        # One outbox row per write: published once each.
        queued = await con.fetchval(
            "SELECT count(*) FROM twin_outbox WHERE tenant_id = $1", tenant_id
        )
    async with db.tenant(tenant_id, readonly=True) as con:
        applied = await con.fetchval(
            "SELECT count(*) FROM rollout_devices WHERE rollout_id = $1 AND state = 'APPLIED'",
            rollout_id,
        )
    assert queued == len(ids) and applied == len(ids)


async def test_two_engines_never_start_more_than_the_rate_allows(
    db: Database, start_engine: EngineFactory, seed_fleet_tenant: FleetFactory
) -> None:
    per_minute = 1200  # one every 50 ms
    ids = [f"Q-{n:03d}" for n in range(200)]
    tenant_id = await seed_fleet_tenant(ids)
    await start_engine()
    await start_engine()
    rollout_id = await create_rollout(db, tenant_id, max_per_minute=per_minute)

    async def some_written() -> bool:
        return len(await start_times(db, tenant_id, rollout_id)) >= 60

    await eventually(some_written, timeout=30, what="60 devices written")
    async with db.tenant(tenant_id) as con:
        await store.change_state(
            con,
            tenant_id,
            rollout_id,
            allowed_from=frozenset({rules.RUNNING}),
            to=rules.PAUSED,
            reason="test",
            wanted="",
        )
    times = await start_times(db, tenant_id, rollout_id)
    # The n-th start (from 0) is allowed n * 60 / rate seconds after the
    # rollout began, whichever engine makes it.
    early = [(n, t) for n, t in enumerate(times) if t < n * 60 / per_minute - 0.001]
    assert not early, early[:5]
    # And the engines keep up with it.
    assert max(t - n * 60 / per_minute for n, t in enumerate(times)) < 2.0
    written = await writes(db, tenant_id)
    assert sorted(written.values()) == [0] * (len(ids) - len(times)) + [1] * len(times)
