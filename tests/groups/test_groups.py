"""Group CRUD through the typed client: both kinds, the version guard, static
members, canonical filters and the upstream web app's JSON."""

from __future__ import annotations

import asyncio
import json

import pulse_client as pc
import pytest
from google.api import annotations_pb2
from google.protobuf import json_format
from pulse.device.v1 import groups_pb2, status_pb2

from server.auth import Role
from server.db import Database
from tests.conftest import ClientFactory, Tenant
from tests.groups.helpers import insert_rows, insert_sites, row

DYNAMIC = groups_pb2.Group.GroupType.DYNAMIC
STATIC = groups_pb2.Group.GroupType.STATIC
UPSTREAM_FILTER = {"status": "ONLINE", "tags": ["production"], "site_id": "site-01"}


async def test_dynamic_group_lifecycle(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await insert_sites(db, tenant.tenant_id, ["site-01"])
    await insert_rows(
        db,
        tenant.tenant_id,
        [
            row("D-1", site_id="site-01", tags={"production": ""}),
            row("D-2", site_id="site-01", tags={"production": ""}, status="OFFLINE"),
            row("D-3", site_id="site-01"),
        ],
    )
    created = await client.groups.create_dynamic("Plant 1 prod", UPSTREAM_FILTER)
    assert created.group_type == DYNAMIC
    assert created.version == 1
    assert created.member_count == 1
    assert created.group_id  # assigned by the server
    assert created.create_time.seconds > 0

    fetched = await client.groups.get(created.group_id)
    assert fetched == created
    assert [m.device_id async for m in client.groups.members(created.group_id)] == ["D-1"]

    renamed = await client.groups.update(
        created.group_id, expected_version=1, name="Plant 1, production"
    )
    assert (renamed.name, renamed.version) == ("Plant 1, production", 2)
    assert renamed.query_filter == created.query_filter  # not in the mask

    widened = await client.groups.update(
        created.group_id, expected_version=2, query_filter={"site_id": "site-01"}
    )
    assert widened.version == 3
    assert widened.member_count == 3
    assert widened.update_time.ToDatetime() >= created.update_time.ToDatetime()

    await client.groups.delete(created.group_id, expected_version=3)
    with pytest.raises(pc.NotFound) as info:
        await client.groups.get(created.group_id)
    assert info.value.reason == "GROUP_NOT_FOUND"
    with pytest.raises(pc.NotFound):
        await client.groups.delete(created.group_id)


async def test_stale_update_is_a_version_conflict_and_changes_nothing(
    client: pc.AsyncPulseClient,
) -> None:
    group = await client.groups.create_dynamic("g", {}, description="first")
    await client.groups.update(group.group_id, expected_version=1, description="second")
    with pytest.raises(pc.VersionConflict) as info:
        await client.groups.update(group.group_id, expected_version=1, name="lost update")
    assert info.value.current_version == 2
    assert info.value.reason == "VERSION_MISMATCH"
    assert info.value.metadata["expected_version"] == "1"
    after = await client.groups.get(group.group_id)
    assert (after.name, after.description, after.version) == ("g", "second", 2)

    with pytest.raises(pc.VersionConflict):
        await client.groups.delete(group.group_id, expected_version=1)
    assert (await client.groups.get(group.group_id)).version == 2


async def test_concurrent_updates_from_one_version_let_exactly_one_win(
    client: pc.AsyncPulseClient,
) -> None:
    group = await client.groups.create_dynamic("race", {})
    results = await asyncio.gather(
        *(
            client.groups.update(group.group_id, expected_version=1, name=f"writer {n}")
            for n in range(8)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, groups_pb2.Group)]
    losers = [r for r in results if isinstance(r, pc.VersionConflict)]
    assert len(winners) == 1 and len(losers) == 7
    current = await client.groups.get(group.group_id)
    assert (current.name, current.version) == (winners[0].name, 2)


async def test_static_group_members(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await insert_rows(
        db,
        tenant.tenant_id,
        [row("S-3", status="OFFLINE"), row("S-1"), row("S-2", lifecycle="DECOMMISSIONED")],
    )
    group = await client.groups.create_static("hand picked", group_id="picked")
    assert (group.group_id, group.group_type, group.member_count) == ("picked", STATIC, 0)
    assert not group.HasField("query_filter")

    added = await client.groups.add_members("picked", ["S-3", "S-1", "S-1", "S-2"])
    assert added.member_count == 3
    again = await client.groups.add_members("picked", ["S-1"])  # already in: skipped
    assert again.member_count == 3
    members = [m async for m in client.groups.members("picked", page_size=2)]
    # Explicit members are listed whatever their state, decommissioned included.
    assert [(m.device_id, m.status) for m in members] == [
        ("S-1", status_pb2.ONLINE),
        ("S-2", status_pb2.ONLINE),
        ("S-3", status_pb2.OFFLINE),
    ]
    removed = await client.groups.remove_members("picked", ["S-2", "NOT-A-MEMBER"])
    assert removed.member_count == 2
    assert await client.groups.count_members("picked") == 2

    with pytest.raises(pc.AlreadyExists):
        await client.groups.create_static("twice", group_id="picked")

    await client.groups.delete("picked")
    async with db.tenant(tenant.tenant_id) as con:
        # The member list went with the group; the devices stayed.
        assert await con.fetchval("SELECT count(*) FROM device_group_members") == 0
        assert await con.fetchval("SELECT count(*) FROM devices") == 3


async def test_member_changes_on_a_dynamic_group_are_refused(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("X-1")])
    group = await client.groups.create_dynamic("dyn", {})
    for call in (client.groups.add_members, client.groups.remove_members):
        with pytest.raises(pc.FailedPrecondition) as info:
            await call(group.group_id, ["X-1"])
        assert info.value.reason == "GROUP_NOT_STATIC"
    static = await client.groups.create_static("static")
    with pytest.raises(pc.FailedPrecondition) as info:
        await client.groups.update(static.group_id, expected_version=1, query_filter={})
    assert info.value.reason == "GROUP_NOT_DYNAMIC"
    async with db.tenant(tenant.tenant_id) as con:
        assert await con.fetchval("SELECT count(*) FROM device_group_members") == 0
        # The schema itself refuses member rows for a dynamic group.
        with pytest.raises(Exception, match="violates"):
            await con.execute(
                "INSERT INTO device_group_members (tenant_id, group_id, device_id)"
                " VALUES ($1, $2, 'X-1')",
                tenant.tenant_id,
                group.group_id,
            )


async def test_equal_filters_are_stored_and_returned_equal(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    a = await client.groups.create_dynamic("a", UPSTREAM_FILTER)
    b = await client.groups.create_dynamic(
        "b",
        {
            "statuses": ["ONLINE", "ONLINE"],
            "site_ids": ["site-01"],
            "tag_selectors": [{"key": "production", "operator": "EXISTS"}],
        },
    )
    assert a.query_filter == b.query_filter
    assert json_format.MessageToDict(a.query_filter, preserving_proto_field_name=True) == {
        "site_ids": ["site-01"],
        "statuses": ["ONLINE"],
        "tag_selectors": [{"key": "production", "operator": "EXISTS"}],
    }
    async with db.tenant(tenant.tenant_id) as con:
        assert await con.fetchval("SELECT count(DISTINCT query_filter) FROM device_groups") == 1


async def test_list_groups_pages_with_member_counts(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("L-1"), row("L-2", status="STALE")])
    for name in ["delta", "alpha", "charlie", "bravo", "echo"]:
        await client.groups.create_dynamic(name, {"status": "ONLINE"})
    static = await client.groups.create_static("alpha")  # names need not be unique
    await client.groups.add_members(static.group_id, ["L-1", "L-2"])

    first = await client.groups.list_page(groups_pb2.ListGroupsRequest(page_size=4))
    assert len(first.groups) == 4 and first.next_page_token
    groups = [g async for g in client.groups.list(page_size=4)]
    assert [g.name for g in groups] == ["alpha", "alpha", "bravo", "charlie", "delta", "echo"]
    assert len({g.group_id for g in groups}) == 6
    counts = {g.group_id: g.member_count for g in groups}
    assert counts[static.group_id] == 2
    assert sorted(counts.values()) == [1, 1, 1, 1, 1, 2]


async def test_viewers_read_and_operators_write(
    client: pc.AsyncPulseClient, tenant: Tenant, connect: ClientFactory
) -> None:
    group = await client.groups.create_dynamic("g", {})
    viewer = await connect(tenant.token(Role.VIEWER))
    assert (await viewer.groups.get(group.group_id)).name == "g"
    assert [g.group_id async for g in viewer.groups.list()] == [group.group_id]
    assert [m async for m in viewer.groups.members(group.group_id)] == []
    assert [m async for m in viewer.groups.preview({})] == []
    writes = [
        viewer.groups.create_dynamic("v", {}),
        viewer.groups.update(group.group_id, expected_version=1, name="v"),
        viewer.groups.delete(group.group_id),
        viewer.groups.add_members(group.group_id, ["X"]),
        viewer.groups.remove_members(group.group_id, ["X"]),
    ]
    for call in writes:
        with pytest.raises(pc.PermissionDenied):
            await call
    operator = await connect(tenant.token(Role.OPERATOR))
    made = await operator.groups.create_dynamic("by operator", {})
    await operator.groups.delete(made.group_id)
    assert (await client.groups.get(group.group_id)).version == 1


async def test_upstream_json_round_trip(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    """What the HTTP gateway will do: the upstream body parsed into the
    request's `body` field, the response printed with proto field names."""
    await insert_sites(db, tenant.tenant_id, ["site-01"])
    await insert_rows(
        db,
        tenant.tenant_id,
        [row("U-1", site_id="site-01", tags={"production": ""}, name="Boiler")],
    )
    body = json.dumps({"name": "prod online", "query_filter": UPSTREAM_FILTER})
    created = await client.groups.create(json_format.Parse(body, groups_pb2.Group()))
    assert created.group_type == DYNAMIC
    request = groups_pb2.ListGroupMembersRequest(group_id=created.group_id, include_total=True)
    response = await client.groups.members_page(request)
    assert json_format.MessageToDict(response, preserving_proto_field_name=True) == {
        "group_id": created.group_id,
        "group_type": "DYNAMIC",
        "members": [
            {"device_id": "U-1", "name": "Boiler", "status": "ONLINE", "site_id": "site-01"}
        ],
        "total": 1,
    }


def _http_rules() -> dict[str, list[tuple[str, str, str]]]:
    service = groups_pb2.DESCRIPTOR.services_by_name["DeviceGroupService"]
    rules: dict[str, list[tuple[str, str, str]]] = {}
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        found = []
        for r in [rule, *rule.additional_bindings]:
            verb = r.WhichOneof("pattern")
            assert verb is not None
            found.append((verb, getattr(r, verb), r.body))
        rules[method.name] = found
    return rules


def test_http_paths_keep_the_upstream_routes() -> None:
    rules = _http_rules()
    assert rules["CreateGroup"][0] == ("post", "/customer/device-groups/dynamic", "group")
    assert rules["ListGroups"][0] == ("get", "/customer/device-groups", "")
    assert rules["ListGroupMembers"][0] == (
        "get",
        "/customer/device-groups/{group_id}/members",
        "",
    )
    assert rules["UpdateGroup"][0] == (
        "patch",
        "/customer/device-groups/{group.group_id}/dynamic",
        "group",
    )
    assert rules["DeleteGroup"][0] == ("delete", "/customer/device-groups/{group_id}/dynamic", "")
    assert set(rules) == {
        "CreateGroup",
        "GetGroup",
        "ListGroups",
        "UpdateGroup",
        "DeleteGroup",
        "ListGroupMembers",
        "AddGroupMembers",
        "RemoveGroupMembers",
        "PreviewFilter",
        "ListDeviceGroups",
        "ListTwinPaths",
        "WatchGroupMembership",
    }
