"""A dynamic group's members are read from the membership the maintainer
keeps plus the changes it has not applied yet: ListGroupMembers and its total
agree with the reference evaluation while the maintainer is held off with
changes queued, and after it has caught up."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence

import pulse_client as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import filters
from server.db import Database
from server.groups import membership_store, store
from server.tenants import ensure_tenant
from tests.groups.helpers import (
    device_values,
    insert_rows,
    insert_sites,
    maintained_members,
    remove_devices,
    state_values,
)
from tests.groups.test_membership import _TenantSwitch, switch  # noqa: F401 (fixture)
from tests.helpers import eventually
from tests.unit.filter_strategies import SITE_IDS, device_rows, filter_dicts

GROUP = "g"


class HeldMaintainer:
    """Holds a tenant's maintainer lock, so that no maintainer applies its
    queued changes (they skip a tenant whose lock is taken)."""

    def __init__(self, db: Database, tenant_id: uuid.UUID) -> None:
        self._db = db
        lock = membership_store.tenant_lock(tenant_id)
        self._key = (lock.classid, lock.objid - (1 << 32) if lock.objid >= 1 << 31 else lock.objid)

    async def __aenter__(self) -> HeldMaintainer:
        self._con = await self._db.pool.acquire()
        await self._con.execute("SELECT pg_advisory_lock($1, $2)", *self._key)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._con.execute("SELECT pg_advisory_unlock($1, $2)", *self._key)
        await self._db.pool.release(self._con)


async def replace_rows(
    db: Database, tenant_id: uuid.UUID, rows: Sequence[filters.DeviceRow]
) -> None:
    """Every column of these devices and their state set as `rows` say."""
    async with db.tenant(tenant_id) as con:
        await con.executemany(
            """
            UPDATE devices SET name = $3, site_id = $4, model = $5, tags = $6, lifecycle = $7
            WHERE tenant_id = $1 AND device_id = $2
            """,
            [device_values(tenant_id, r) for r in rows],
        )
        await con.executemany(
            """
            UPDATE device_state SET status = $3, last_seen_at = $4, desired = $5, reported = $6,
                desired_version = $7, reported_version = $8,
                desired_updated_at = $9, reported_updated_at = $10
            WHERE tenant_id = $1 AND device_id = $2
            """,
            [state_values(tenant_id, r) for r in rows],
        )


async def delete_rows(db: Database, tenant_id: uuid.UUID, device_ids: Sequence[str]) -> None:
    """As maintenance does: the service itself decommissions devices."""
    async with db.admin() as con:
        await con.execute(
            "DELETE FROM devices WHERE tenant_id = $1 AND device_id = ANY($2::text[])",
            tenant_id,
            list(device_ids),
        )


async def queued(db: Database, tenant_id: uuid.UUID) -> int:
    async with db.tenant(tenant_id, readonly=True) as con:
        return int(
            await con.fetchval(
                "SELECT count(*) FROM membership_changes WHERE tenant_id = $1", tenant_id
            )
        )


async def listed(client: pc.AsyncPulseClient) -> tuple[list[str], int]:
    paged = [m.device_id async for m in client.groups.members(GROUP, page_size=3)]
    return paged, await client.groups.count_members(GROUP)


# Per device of the first fleet: kept, replaced by another row, or deleted.
_FATES = st.sampled_from(["keep", "replace", "delete"])


@pytest.fixture
async def cleanup(db: Database) -> AsyncIterator[list[uuid.UUID]]:
    tenants: list[uuid.UUID] = []
    yield tenants
    for tenant_id in tenants:
        await remove_devices(db, tenant_id)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.lists(device_rows(), unique_by=lambda r: r.device_id, max_size=12),
    fates=st.lists(_FATES, min_size=12, max_size=12),
    replacements=st.lists(device_rows(), min_size=12, max_size=12),
    added=st.lists(device_rows(), unique_by=lambda r: r.device_id, max_size=4),
    spec=filter_dicts(),
)
async def test_members_are_current_with_changes_queued_and_after_they_are_applied(
    before: list[filters.DeviceRow],
    fates: list[str],
    replacements: list[filters.DeviceRow],
    added: list[filters.DeviceRow],
    spec: dict[str, object],
    db: Database,
    switch: tuple[_TenantSwitch, pc.AsyncPulseClient],  # noqa: F811 (fixture)
    cleanup: list[uuid.UUID],
) -> None:
    tokens, client = switch
    tenant_id = uuid.uuid4()
    cleanup.append(tenant_id)
    async with db.admin() as con:
        await ensure_tenant(con, tenant_id, "property")
    await insert_sites(db, tenant_id, SITE_IDS)
    await insert_rows(db, tenant_id, before)
    tokens.use(tenant_id)
    parsed = filters.parse_filter(spec)
    async with db.tenant(tenant_id) as con:
        await store.create_group(
            con,
            tenant_id,
            group_id=GROUP,
            name="property",
            description="",
            group_type=store.DYNAMIC,
            query_filter=filters.canonical_json(parsed),
        )

    def reference(rows: Sequence[filters.DeviceRow]) -> list[str]:
        return sorted(r.device_id for r in rows if filters.matches(parsed, r))

    expected = reference(before)
    await eventually(lambda: _drained(db, tenant_id), what="the queue drained")
    assert await maintained_members(db, tenant_id, GROUP) == expected

    ids = {r.device_id for r in before}
    fresh = [r for r in added if r.device_id not in ids]
    kept, replaced, deleted = [], [], []
    for r, fate, other in zip(before, fates, replacements, strict=False):
        if fate == "keep":
            kept.append(r)
        elif fate == "replace":
            replaced.append(dataclasses.replace(other, device_id=r.device_id))
        else:
            deleted.append(r.device_id)
    after = [*kept, *replaced, *fresh]

    async with HeldMaintainer(db, tenant_id):
        await replace_rows(db, tenant_id, replaced)
        await delete_rows(db, tenant_id, deleted)
        await insert_rows(db, tenant_id, fresh)
        assert await listed(client) == (reference(after), len(reference(after)))
        # Held off: the rows are still the old membership.
        assert await maintained_members(db, tenant_id, GROUP) == expected

    await eventually(lambda: _drained(db, tenant_id), what="the queue drained")
    assert await maintained_members(db, tenant_id, GROUP) == reference(after)
    assert await listed(client) == (reference(after), len(reference(after)))


async def _drained(db: Database, tenant_id: uuid.UUID) -> bool:
    return await queued(db, tenant_id) == 0
