"""Membership is computed at read time: the SQL agrees with the reference
evaluation, follows device state without any other action, and pages
correctly while devices change between pages."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pulse_client as pc
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pulse.device.v1 import filter_pb2, groups_pb2

from server import config, filters
from server.auth import Role, mint_token
from server.db import Database
from server.groups import store
from server.tenants import ensure_tenant
from tests.conftest import ClientFactory, Tenant
from tests.groups.helpers import insert_rows, insert_sites, remove_devices, row, set_status
from tests.unit.filter_strategies import SITE_IDS, device_rows, filter_dicts


class _TenantSwitch:
    """One client whose token names whichever tenant a Hypothesis example made."""

    def __init__(self, settings: config.Settings) -> None:
        self._settings = settings
        self.token = ""

    def use(self, tenant_id: uuid.UUID) -> None:
        self.token = mint_token(
            self._settings.secret,
            tenant_id=tenant_id,
            role=Role.VIEWER,
            audience=self._settings.jwt_audience,
        )


@pytest.fixture
async def switch(
    settings: config.Settings, target: str
) -> AsyncIterator[tuple[_TenantSwitch, pc.AsyncPulseClient]]:
    tokens = _TenantSwitch(settings)
    client = await pc.AsyncPulseClient.connect(target, token=lambda: tokens.token)
    try:
        yield tokens, client
    finally:
        await client.close()


def _message(parsed: filters.DeviceFilter) -> filter_pb2.DeviceFilter:
    return json_format.ParseDict(filters.canonical_json(parsed), filter_pb2.DeviceFilter())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(device_rows(), unique_by=lambda r: r.device_id, max_size=20),
    spec=filter_dicts(),
)
async def test_sql_selects_exactly_what_the_reference_evaluation_selects(
    rows: list[filters.DeviceRow],
    spec: dict[str, object],
    db: Database,
    switch: tuple[_TenantSwitch, pc.AsyncPulseClient],
) -> None:
    tokens, client = switch
    tenant_id = uuid.uuid4()
    async with db.admin() as con:
        await ensure_tenant(con, tenant_id, "property")
    await insert_sites(db, tenant_id, SITE_IDS)
    await insert_rows(db, tenant_id, rows)
    try:
        tokens.use(tenant_id)

        parsed = filters.parse_filter(spec)
        expected = sorted(r.device_id for r in rows if filters.matches(parsed, r))

        request = groups_pb2.PreviewFilterRequest(
            query_filter=_message(parsed), page_size=1000, include_total=True
        )
        preview = await client.groups.preview_page(request)
        assert [m.device_id for m in preview.members] == expected
        assert preview.total == len(expected)
        assert preview.next_page_token == ""

        # Small pages walk the same members, each exactly once.
        paged = [m.device_id async for m in client.groups.preview(_message(parsed), page_size=3)]
        assert paged == expected
    finally:
        await remove_devices(db, tenant_id)


async def test_membership_follows_state_with_no_other_action(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await insert_sites(db, tenant.tenant_id, ["plant-7"])
    await insert_rows(
        db,
        tenant.tenant_id,
        [
            row("M-1", site_id="plant-7", tags={"env": "prod"}),
            row("M-2", site_id="plant-7", tags={"env": "prod"}),
            row("M-3", site_id="plant-7", tags={"env": "dev"}),
            row("M-4", tags={"env": "prod"}),
        ],
    )
    group = await client.groups.create_dynamic(
        "online prod at plant 7",
        {
            "status": "ONLINE",
            "site_id": "plant-7",
            "tag_selectors": [{"key": "env", "operator": "EQUALS", "values": ["prod"]}],
        },
    )

    async def members() -> list[str]:
        return [m.device_id async for m in client.groups.members(group.group_id)]

    assert await members() == ["M-1", "M-2"]
    await set_status(db, tenant.tenant_id, ["M-2"], "STALE")
    assert await members() == ["M-1"]
    assert await client.groups.count_members(group.group_id) == 1
    assert (await client.groups.get(group.group_id)).member_count == 1
    await set_status(db, tenant.tenant_id, ["M-2"], "ONLINE", datetime.now(UTC))
    assert await members() == ["M-1", "M-2"]
    # Registry changes count just the same.
    await client.devices.update("M-3", tags={"env": "prod"})
    await client.devices.decommission("M-1")
    assert await members() == ["M-2", "M-3"]


async def test_pages_never_repeat_a_device_while_devices_change(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    ids = [f"P-{n:03d}" for n in range(0, 80, 2)]  # even ids; odd ones appear later
    await insert_rows(db, tenant.tenant_id, [row(i) for i in ids])
    group = await client.groups.create_dynamic("online", {"status": "ONLINE"})

    seen: list[str] = []
    token = ""
    flapped: set[str] = set()  # went offline ahead of the cursor and came back
    gone: set[str] = set()  # went stale ahead of the cursor and stayed so
    added: dict[str, str] = {}  # new id -> the cursor when it was added
    step = 0
    while True:
        request = groups_pb2.ListGroupMembersRequest(
            group_id=group.group_id, page_size=7, page_token=token
        )
        page = await client.groups.members_page(request)
        seen += [m.device_id for m in page.members]
        token = page.next_page_token
        if not token:
            break
        cursor = seen[-1]
        step += 1
        behind = [i for i in ids if i <= cursor]
        ahead = [i for i in ids if i > cursor and i not in gone]
        # Devices already returned go offline and come back: no repeat.
        await set_status(db, tenant.tenant_id, behind[-3:], "OFFLINE")
        await set_status(db, tenant.tenant_id, behind[-3:], "ONLINE")
        if len(ahead) > 4:
            await set_status(db, tenant.tenant_id, [ahead[1]], "STALE")
            gone.add(ahead[1])
            await set_status(db, tenant.tenant_id, [ahead[3]], "OFFLINE")
            await set_status(db, tenant.tenant_id, [ahead[3]], "ONLINE")
            flapped.add(ahead[3])
        for new in (f"P-{2 * step + 41:03d}", f"P-{step * 4 - 1:03d}"):
            if new not in added and new not in ids:
                added[new] = cursor
                await insert_rows(db, tenant.tenant_id, [row(new)])

    assert len(seen) == len(set(seen)), "a device came twice"
    assert seen == sorted(seen)
    assert not gone & set(seen)
    assert flapped <= set(seen)
    assert set(ids) - gone <= set(seen)
    assert any(i > c for i, c in added.items()) and any(i < c for i, c in added.items())
    for device_id, cursor in added.items():
        assert (device_id in seen) == (device_id > cursor), device_id


async def test_member_page_tokens_are_bound_to_their_listing(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant, connect: ClientFactory
) -> None:
    await insert_rows(db, tenant.tenant_id, [row(f"T-{n}") for n in range(5)])
    a = await client.groups.create_dynamic("a", {})
    b = await client.groups.create_dynamic("b", {})
    first = await client.groups.members_page(
        groups_pb2.ListGroupMembersRequest(group_id=a.group_id, page_size=2)
    )
    assert first.next_page_token and "total" not in json_format.MessageToDict(first)
    assert not first.HasField("total")

    async def page(group_id: str, token: str) -> groups_pb2.ListGroupMembersResponse:
        request = groups_pb2.ListGroupMembersRequest(
            group_id=group_id, page_size=2, page_token=token
        )
        return await client.groups.members_page(request)

    second = await page(a.group_id, first.next_page_token)
    assert [m.device_id for m in second.members] == ["T-2", "T-3"]
    with pytest.raises(pc.InvalidArgument) as info:
        await page(b.group_id, first.next_page_token)
    assert "other parameters" in info.value.message
    tampered = first.next_page_token[:-2] + ("AA" if first.next_page_token[-2:] != "AA" else "BB")
    with pytest.raises(pc.InvalidArgument) as info:
        await page(a.group_id, tampered)
    assert info.value.field_violations[0].field == "page_token"
    preview = await client.groups.preview_page(
        groups_pb2.PreviewFilterRequest(query_filter=filter_pb2.DeviceFilter(), page_size=2)
    )
    with pytest.raises(pc.InvalidArgument):  # a preview token is not a members token
        await page(a.group_id, preview.next_page_token)
    with pytest.raises(pc.InvalidArgument):  # nor one for another filter
        await client.groups.preview_page(
            groups_pb2.PreviewFilterRequest(
                query_filter=filter_pb2.DeviceFilter(device_id_prefix="T-"),
                page_size=2,
                page_token=preview.next_page_token,
            )
        )


async def test_counts_past_the_probe_are_exact_and_leave_no_settings(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    """A count with tag and state conditions goes past the capped probe
    (store.COUNT_PROBE) to the bulk count, which must still be exact and must
    not change how the rest of the transaction is planned."""
    devices = store.COUNT_PROBE + 4_000
    size = sum(1 for n in range(1, devices + 1) if n % 4)  # those tagged t
    assert size > store.COUNT_PROBE
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute(
            """
            WITH d AS (
                INSERT INTO devices (tenant_id, device_id, tags)
                SELECT $1, 'B-' || lpad(n::text, 6, '0'),
                       CASE WHEN n % 4 = 0 THEN '{}' ELSE '{"t": ""}' END::jsonb
                FROM generate_series(1, $2) n
                RETURNING tenant_id, device_id
            )
            INSERT INTO device_state (tenant_id, device_id, status)
            SELECT tenant_id, device_id, 'ONLINE' FROM d
            """,
            tenant.tenant_id,
            devices,
        )
    spec = {"status": "ONLINE", "tags": ["t"]}
    group = await client.groups.create_dynamic("big", spec)
    small = await client.groups.create_dynamic("small", {**spec, "device_id_prefix": "B-00001"})
    assert group.member_count == size
    assert small.member_count == 8
    assert {g.name: g.member_count async for g in client.groups.list()} == {
        "big": size,
        "small": 8,
    }
    async with db.tenant(tenant.tenant_id, readonly=True) as con:
        before = await con.fetchval("SHOW work_mem")
        count = await store.count_filter_members(con, tenant.tenant_id, filters.parse_filter(spec))
        assert count == size
        assert await con.fetchval("SHOW enable_nestloop") == "on"
        assert await con.fetchval("SHOW work_mem") == before
