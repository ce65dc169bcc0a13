"""Tenant isolation and injection: a group resolves only its own tenant's
devices whatever its filter, and hostile strings in a filter are just values."""

from __future__ import annotations

import uuid

import asyncpg
import pulse_client as pc
import pytest
from google.protobuf import json_format
from pulse.device.v1 import filter_pb2, groups_pb2

from server import filters
from server.db import Database
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.groups.helpers import insert_rows, insert_sites, row
from tests.registry.test_tenancy import other_tenant
from tests.unit.filter_strategies import INJECTION_STRINGS

# Filters that select everything a tenant has, one way or another.
EVERYTHING: list[dict[str, object]] = [
    {},
    {"include_decommissioned": True},
    {"device_id_prefix": "SHARED"},
    {"tag_selectors": [{"key": "owner", "operator": "EXISTS"}]},
    {"tag_selectors": [{"key": "owner", "operator": "NOT_EQUALS", "values": ["nobody"]}]},
    {"statuses": ["ONLINE", "STALE", "OFFLINE", "UNKNOWN"], "include_decommissioned": True},
]


async def _fleet(db: Database, tenant_id: uuid.UUID, owner: str) -> None:
    await insert_sites(db, tenant_id, ["site-01"])
    await insert_rows(
        db,
        tenant_id,
        [
            row("SHARED-1", site_id="site-01", tags={"owner": owner}),
            row("SHARED-2", tags={"owner": owner}, lifecycle="DECOMMISSIONED"),
            row(f"SHARED-{owner}", tags={"owner": owner}, status="OFFLINE"),
        ],
    )


@pytest.mark.parametrize("spec", EVERYTHING, ids=lambda s: str(s)[:40])
async def test_a_group_never_resolves_another_tenants_devices(
    spec: dict[str, object],
    client: pc.AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    make_tenant: TenantFactory,
    connect: ClientFactory,
) -> None:
    other = await make_tenant()
    await _fleet(db, tenant.tenant_id, "mine")
    await _fleet(db, other.tenant_id, "theirs")
    group = await client.groups.create_dynamic("all", spec)
    mine = [m.device_id async for m in client.groups.members(group.group_id)]
    assert mine and set(mine) <= {"SHARED-1", "SHARED-2", "SHARED-mine"}
    assert [m.device_id async for m in client.groups.preview(spec)] == mine

    stranger = await connect(other.token())
    theirs = [m.device_id async for m in stranger.groups.preview(spec)]
    assert set(theirs) <= {"SHARED-1", "SHARED-2", "SHARED-theirs"}
    with pytest.raises(pc.NotFound):
        await stranger.groups.get(group.group_id)
    with pytest.raises(pc.NotFound):
        await stranger.groups.members(group.group_id).pages.__anext__()
    with pytest.raises(pc.NotFound):
        await stranger.groups.update(group.group_id, expected_version=1, name="hijacked")
    with pytest.raises(pc.NotFound):
        await stranger.groups.delete(group.group_id)
    assert [g async for g in stranger.groups.list()] == []
    assert (await client.groups.get(group.group_id)).name == "all"


async def test_static_groups_and_raw_sql_stay_in_their_tenant(
    client: pc.AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    make_tenant: TenantFactory,
    connect: ClientFactory,
) -> None:
    stranger = await other_tenant(make_tenant, connect)
    await stranger.devices.create("THEIRS-1")
    static = await client.groups.create_static("mine", group_id="same-id")
    # Another tenant's device does not exist here.
    with pytest.raises(pc.InvalidArgument) as info:
        await client.groups.add_members(static.group_id, ["THEIRS-1"])
    assert info.value.field_violations[0].field == "device_ids[0]"
    with pytest.raises(pc.NotFound):
        await stranger.groups.add_members(static.group_id, ["THEIRS-1"])
    # Group ids are per tenant.
    assert (await stranger.groups.create_static("theirs", group_id="same-id")).name == "theirs"

    async with db.tenant(tenant.tenant_id) as con:
        names = [r["name"] for r in await con.fetch("SELECT name FROM device_groups")]
        assert names == ["mine"]
    foreign = uuid.uuid4()
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.tenant(tenant.tenant_id) as con:
            await con.execute(
                "INSERT INTO device_groups (tenant_id, group_id, name, group_type)"
                " VALUES ($1, 'sneak', 'x', 'STATIC')",
                foreign,
            )
    async with db.admin() as con, con.transaction():
        await con.execute("SET LOCAL ROLE pulse_app")  # no tenant named: nothing visible
        assert await con.fetchval("SELECT count(*) FROM device_groups") == 0
        assert await con.fetchval("SELECT count(*) FROM device_group_members") == 0


def _with_value(field: str, value: str) -> dict[str, object]:
    """A filter putting `value` into one string field."""
    if field.startswith("selector:"):
        operator = field.split(":", 1)[1]
        key_only = operator in ("EXISTS", "DOES_NOT_EXIST")
        return {
            "tag_selectors": [
                {"key": value, "operator": operator}
                if key_only
                else {"key": "env", "operator": operator, "values": [value]}
            ]
        }
    if field in ("site_ids", "tags", "models"):
        return {field: [value]}
    return {field: value}


STRING_FIELDS = [
    "site_id",
    "site_ids",
    "tags",
    "device_id_prefix",
    "name_prefix",
    "models",
    "selector:EXISTS",
    "selector:DOES_NOT_EXIST",
    "selector:EQUALS",
    "selector:NOT_EQUALS",
    "selector:IN",
    "selector:NOT_IN",
]


@pytest.mark.parametrize("field", STRING_FIELDS)
async def test_injection_in_every_string_field_is_only_a_value(
    field: str,
    client: pc.AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    make_tenant: TenantFactory,
) -> None:
    other = await make_tenant()
    await _fleet(db, other.tenant_id, "theirs")
    devices = [
        row("INJ-1", tags={"env": "prod"}, name="Boiler"),
        row("INJ-2", tags={"env": "x' OR 1=1; --"}, name="' OR '1'='1"),
        row("INJ-3", model="m1"),
    ]
    await insert_rows(db, tenant.tenant_id, devices)
    for value in INJECTION_STRINGS:
        spec = _with_value(field, value)
        parsed = filters.parse_filter(spec)
        expected = sorted(r.device_id for r in devices if filters.matches(parsed, r))
        got = [m.device_id async for m in client.groups.preview(spec)]
        assert got == expected, (field, value)
        group = await client.groups.create_dynamic(f"inj {field}", spec)
        assert [m.device_id async for m in client.groups.members(group.group_id)] == expected
        # Stored and returned verbatim, as a value.
        stored = json_format.MessageToDict(group.query_filter, preserving_proto_field_name=True)
        assert stored == filters.canonical_json(parsed)
    async with db.tenant(tenant.tenant_id) as con:
        assert await con.fetchval("SELECT count(*) FROM devices") == 3
        assert await con.fetchval("SELECT count(*) FROM device_groups") == len(INJECTION_STRINGS)
    async with db.tenant(other.tenant_id) as con:
        assert await con.fetchval("SELECT count(*) FROM devices") == 3


async def test_preview_of_an_unset_filter_is_every_active_device(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("A-1"), row("A-2", lifecycle="DECOMMISSIONED")])
    response = await client.groups.preview_page(groups_pb2.PreviewFilterRequest())
    assert [m.device_id for m in response.members] == ["A-1"]
    assert response.query_filter == filter_pb2.DeviceFilter()
