"""ListDeviceGroups: the groups a device is in right now, static and dynamic,
through the typed clients (async and sync) and the HTTP gateway."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import pulse_client as pc
import pytest
from pulse.device.v1 import groups_pb2

from server import config
from server.auth import Principal, Role, reset_principal, set_principal
from server.db import Database
from server.groups.membership_watch import MembershipWatches
from server.groups.service import DeviceGroupService
from server.listener import Listener
from server.pagination import PageTokens
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.groups.helpers import insert_rows, insert_sites, row, set_status

DYNAMIC = groups_pb2.Group.GroupType.DYNAMIC
STATIC = groups_pb2.Group.GroupType.STATIC

ONLINE_PROD = {
    "status": "ONLINE",
    "tag_selectors": [{"key": "env", "operator": "EQUALS", "values": ["prod"]}],
}
DEV_ONLY = {"tag_selectors": [{"key": "env", "operator": "EQUALS", "values": ["dev"]}]}


async def _names(client: pc.AsyncPulseClient, device_id: str) -> list[str]:
    return [g.name for g in await client.groups.device_groups(device_id)]


async def _arrange(client: pc.AsyncPulseClient, db: Database, tenant: Tenant) -> None:
    """D-1 (online, env=prod) in two static groups and selected by one
    dynamic group; D-2 elsewhere; groups that do not have D-1."""
    await insert_sites(db, tenant.tenant_id, ["plant-7"])
    await insert_rows(
        db,
        tenant.tenant_id,
        [
            row("D-1", site_id="plant-7", tags={"env": "prod"}, name="Boiler"),
            row("D-2", tags={"env": "dev"}),
        ],
    )
    # Two static groups of the same name: ordered by group_id after the name.
    await client.groups.create_static("alpha", group_id="static-b")
    await client.groups.create_static("alpha", group_id="static-a")
    await client.groups.create_static("unrelated", group_id="static-other")
    await client.groups.add_members("static-a", ["D-1", "D-2"])
    await client.groups.add_members("static-b", ["D-1"])
    await client.groups.add_members("static-other", ["D-2"])
    await client.groups.create_dynamic("bravo online prod", ONLINE_PROD, group_id="dyn-prod")
    await client.groups.create_dynamic("charlie dev", DEV_ONLY, group_id="dyn-dev")
    await client.groups.create_dynamic(
        "delta everything", {"include_decommissioned": True}, group_id="dyn-all"
    )


async def test_static_and_dynamic_groups_of_a_device(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await _arrange(client, db, tenant)
    groups = await client.groups.device_groups("D-1")
    assert [(g.group_id, g.name, g.group_type) for g in groups] == [
        ("static-a", "alpha", STATIC),
        ("static-b", "alpha", STATIC),
        ("dyn-prod", "bravo online prod", DYNAMIC),
        ("dyn-all", "delta everything", DYNAMIC),
    ]
    # Whole Group messages, as GetGroup returns them, except the count.
    for g in groups:
        expected = await client.groups.get(g.group_id)
        expected.member_count = 0
        assert g == expected
    assert groups[2].HasField("query_filter") and not groups[0].HasField("query_filter")

    assert await _names(client, "D-2") == [
        "alpha",
        "charlie dev",
        "delta everything",
        "unrelated",
    ]
    # The same answer as every group's member listing.
    for device_id in ("D-1", "D-2"):
        mine = {g.group_id for g in await client.groups.device_groups(device_id)}
        listed = {
            g.group_id
            async for g in client.groups.list()
            if device_id in [m.device_id async for m in client.groups.members(g.group_id)]
        }
        assert mine == listed


async def test_the_answer_follows_the_device_at_once(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await _arrange(client, db, tenant)
    everywhere = ["alpha", "alpha", "bravo online prod", "delta everything"]
    assert await _names(client, "D-1") == everywhere

    await set_status(db, tenant.tenant_id, ["D-1"], "OFFLINE")
    assert await _names(client, "D-1") == ["alpha", "alpha", "delta everything"]
    await set_status(db, tenant.tenant_id, ["D-1"], "ONLINE", datetime.now(UTC))
    assert await _names(client, "D-1") == everywhere

    await client.devices.update("D-1", tags={"env": "dev"})
    assert await _names(client, "D-1") == ["alpha", "alpha", "charlie dev", "delta everything"]

    await client.groups.remove_members("static-b", ["D-1"])
    await client.groups.update("dyn-dev", expected_version=1, query_filter={"name_prefix": "Boil"})
    assert await _names(client, "D-1") == ["alpha", "charlie dev", "delta everything"]


async def test_a_decommissioned_device_stays_in_static_groups_only(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await _arrange(client, db, tenant)
    await client.devices.decommission("D-1")
    groups = await client.groups.device_groups("D-1")
    # Static groups list it whatever its lifecycle; dynamic ones drop it,
    # except one whose filter asks for decommissioned devices too.
    assert [g.group_id for g in groups] == ["static-a", "static-b", "dyn-all"]


async def test_twin_conditions_and_sync_status_use_the_configured_threshold(
    client: pc.AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    settings: config.Settings,
    dsn: str,
) -> None:
    written = datetime.now(UTC) - timedelta(minutes=10)
    behind = dataclasses.replace(
        row("T-1"),
        desired={"mode": "eco"},
        reported={"mode": "turbo", "fw": "1.2"},
        desired_version=2,
        reported_version=1,
        desired_updated_at=written,
        reported_updated_at=written,
    )
    await insert_rows(db, tenant.tenant_id, [behind])
    await client.groups.create_dynamic(
        "fw 1.2",
        {
            "twin_conditions": [
                {"document": "REPORTED", "path": "fw", "operator": "EQUALS", "values": ["1.2"]}
            ]
        },
        group_id="fw",
    )
    await client.groups.create_dynamic("pending", {"sync_statuses": ["PENDING"]}, group_id="p")
    await client.groups.create_dynamic("stale", {"sync_statuses": ["STALE"]}, group_id="s")

    # The test server runs with the default threshold (300 s): ten minutes
    # behind is STALE, as the member listing says too.
    assert settings.twin_stale_after_s == 300
    assert [g.group_id for g in await client.groups.device_groups("T-1")] == ["fw", "s"]
    assert [m.device_id async for m in client.groups.members("s")] == ["T-1"]

    # A service configured with an hour's threshold sees it PENDING.
    tokens = PageTokens(settings.secret)
    service = DeviceGroupService(
        db,
        tokens,
        memberships=MembershipWatches(db, Listener(dsn), tokens),
        stale_after=timedelta(hours=1),
    )
    token = set_principal(Principal("test", tenant.tenant_id, Role.VIEWER))
    try:
        request = groups_pb2.ListDeviceGroupsRequest(device_id="T-1")
        response = await service.ListDeviceGroups(request, cast(Any, None))
    finally:
        reset_principal(token)
    assert response.device_id == "T-1"
    assert [g.group_id for g in response.groups] == ["fw", "p"]


async def test_unknown_and_other_tenants_devices_are_not_found(
    client: pc.AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    make_tenant: TenantFactory,
    connect: ClientFactory,
) -> None:
    await _arrange(client, db, tenant)
    with pytest.raises(pc.NotFound) as info:
        await client.groups.device_groups("NO-SUCH-DEVICE")
    assert info.value.reason == "DEVICE_NOT_FOUND"

    other = await make_tenant()
    stranger = await connect(other.token(Role.VIEWER))
    with pytest.raises(pc.NotFound) as info:
        await stranger.groups.device_groups("D-1")
    assert info.value.reason == "DEVICE_NOT_FOUND"
    # Their own device of the same id sees only their groups.
    await insert_rows(db, other.tenant_id, [row("D-1", tags={"env": "prod"})])
    theirs = await connect(other.token(Role.OPERATOR))
    await theirs.groups.create_dynamic("theirs", ONLINE_PROD, group_id="dyn-prod")
    assert [g.name for g in await theirs.groups.device_groups("D-1")] == ["theirs"]
    assert len(await client.groups.device_groups("D-1")) == 4


@pytest.mark.parametrize(
    ("device_id", "message"),
    [("", "is required"), ("bad id!", "is not a valid id")],
)
async def test_a_bad_device_id_is_a_field_violation(
    client: pc.AsyncPulseClient, device_id: str, message: str
) -> None:
    with pytest.raises(pc.InvalidArgument) as info:
        await client.groups.device_groups(device_id)
    [violation] = info.value.field_violations
    assert violation.field == "device_id"
    assert message in violation.description


async def test_viewers_may_ask_with_either_client(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant, connect: ClientFactory, target: str
) -> None:
    await _arrange(client, db, tenant)
    viewer = await connect(tenant.token(Role.VIEWER))
    expected = await client.groups.device_groups("D-1")
    assert await viewer.groups.device_groups("D-1") == expected

    def blocking() -> list[groups_pb2.Group]:
        with pc.PulseClient.connect(target, token=tenant.token(Role.VIEWER)) as sync:
            return sync.groups.device_groups("D-1")

    assert await asyncio.to_thread(blocking) == expected


async def test_http_route_beside_the_device_routes(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await _arrange(client, db, tenant)
    h = {"Authorization": f"Bearer {tenant.token(Role.VIEWER)}"}
    r = await http.get("/customer/devices/D-1/groups", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["device_id"] == "D-1"
    assert [g["group_id"] for g in body["groups"]] == [
        "static-a",
        "static-b",
        "dyn-prod",
        "dyn-all",
    ]
    assert [(g["group_type"], g["member_count"]) for g in body["groups"]] == [
        ("static", 0),
        ("static", 0),
        ("dynamic", 0),
        ("dynamic", 0),
    ]
    assert body["groups"][2]["query_filter"]["statuses"] == ["ONLINE"]

    # The device's own route still answers with the device.
    r = await http.get("/customer/devices/D-1", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["device_id"] == "D-1" and "groups" not in r.json()

    r = await http.get("/customer/devices/NO-SUCH-DEVICE/groups", headers=h)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["status"] == "NOT_FOUND"
