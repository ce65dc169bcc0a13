"""Bad input: INVALID_ARGUMENT with field violations pointing at the offending
part, NOT_FOUND for unknown groups, and nothing written."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

import grpc
import pulse_client as pc
import pytest
from google.protobuf import field_mask_pb2
from pulse.device.v1 import filter_pb2, groups_pb2, groups_pb2_grpc, status_pb2

from server.db import Database
from tests.conftest import Tenant
from tests.groups.helpers import insert_rows, row

Group = groups_pb2.Group
Selector = filter_pb2.TagSelector


@pytest.fixture
async def stub(target: str) -> AsyncIterator[groups_pb2_grpc.DeviceGroupServiceAsyncStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield groups_pb2_grpc.DeviceGroupServiceStub(channel)


async def _error(call: Awaitable[Any]) -> pc.PulseError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return pc.from_rpc_error(info.value)


async def _invalid(call: Awaitable[Any]) -> list[str]:
    """The fields an INVALID_ARGUMENT names."""
    error = await _error(call)
    assert isinstance(error, pc.InvalidArgument), error
    assert error.field_violations, error
    return [v.field for v in error.field_violations]


def _md(tenant: Tenant) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tenant.token()}"),)


def _dynamic(flt: filter_pb2.DeviceFilter, **fields: Any) -> Group:
    group = Group(**{"name": "g", **fields})
    group.query_filter.CopyFrom(flt)
    group.query_filter.SetInParent()
    return group


BAD_GROUPS: dict[str, tuple[Group, list[str]]] = {
    "no name": (_dynamic(filter_pb2.DeviceFilter(), name=""), ["group.name"]),
    "long name": (_dynamic(filter_pb2.DeviceFilter(), name="n" * 257), ["group.name"]),
    "bad id": (_dynamic(filter_pb2.DeviceFilter(), group_id="has space"), ["group.group_id"]),
    "control char": (
        _dynamic(filter_pb2.DeviceFilter(), description="line\nbreak"),
        ["group.description"],
    ),
    "unspecified status": (
        _dynamic(filter_pb2.DeviceFilter(statuses=[status_pb2.CONNECTIVITY_STATUS_UNSPECIFIED])),
        ["group.query_filter.statuses[0]"],
    ),
    "equals with two values": (
        _dynamic(
            filter_pb2.DeviceFilter(
                tag_selectors=[Selector(key="env", operator=Selector.EQUALS, values=["a", "b"])]
            )
        ),
        ["group.query_filter.tag_selectors[0].values"],
    ),
    "selector without operator": (
        _dynamic(filter_pb2.DeviceFilter(tag_selectors=[Selector(key="env")])),
        ["group.query_filter.tag_selectors[0].operator"],
    ),
    "control char in site": (
        _dynamic(filter_pb2.DeviceFilter(site_ids=["ok", "bad\x00"])),
        ["group.query_filter.site_ids[1]"],
    ),
    "static with a filter": (
        _dynamic(filter_pb2.DeviceFilter(), group_type=Group.GroupType.STATIC),
        ["group.query_filter"],
    ),
    "dynamic without a filter": (
        Group(name="g", group_type=Group.GroupType.DYNAMIC),
        ["group.query_filter"],
    ),
    "unknown kind": (Group(name="g", group_type=cast(Any, 7)), ["group.group_type"]),
    "several at once": (
        _dynamic(filter_pb2.DeviceFilter(tags=["", "x" * 129]), name="", group_id="-x"),
        [
            "group.group_id",
            "group.name",
            "group.query_filter.tags[0]",
            "group.query_filter.tags[1]",
        ],
    ),
}


@pytest.mark.parametrize("case", list(BAD_GROUPS))
async def test_bad_create(
    case: str,
    stub: groups_pb2_grpc.DeviceGroupServiceAsyncStub,
    tenant: Tenant,
    db: Database,
) -> None:
    group, fields = BAD_GROUPS[case]
    request = groups_pb2.CreateGroupRequest(group=group)
    assert await _invalid(stub.CreateGroup(request, metadata=_md(tenant))) == fields
    async with db.tenant(tenant.tenant_id) as con:
        assert await con.fetchval("SELECT count(*) FROM device_groups") == 0


async def test_bad_update_and_delete(
    stub: groups_pb2_grpc.DeviceGroupServiceAsyncStub,
    client: pc.AsyncPulseClient,
    tenant: Tenant,
) -> None:
    group = await client.groups.create_dynamic("before", {"status": "ONLINE"})

    def update(paths: list[str], version: int = 1, **fields: Any) -> Any:
        request = groups_pb2.UpdateGroupRequest(
            group=Group(group_id=group.group_id, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            expected_version=version,
        )
        return stub.UpdateGroup(request, metadata=_md(tenant))

    assert await _invalid(update([])) == ["update_mask"]
    assert await _invalid(update(["name", "group_type"], name="x")) == ["update_mask.paths"]
    assert await _invalid(update(["name"], version=0, name="x")) == ["expected_version"]
    unguarded = groups_pb2.UpdateGroupRequest(
        group=Group(group_id=group.group_id, name="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    )
    assert await _invalid(update(["name"], name="")) == ["group.name"]
    assert await _invalid(update(["query_filter"])) == ["group.query_filter"]
    bad_filter = groups_pb2.UpdateGroupRequest(
        group=_dynamic(
            filter_pb2.DeviceFilter(tag_selectors=[Selector(key="k", operator=Selector.IN)]),
            group_id=group.group_id,
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["query_filter"]),
        expected_version=1,
    )
    assert await _invalid(stub.UpdateGroup(bad_filter, metadata=_md(tenant))) == [
        "group.query_filter.tag_selectors[0].values"
    ]
    bad_id = groups_pb2.UpdateGroupRequest(
        group=Group(group_id="", name="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        expected_version=1,
    )
    assert await _invalid(stub.UpdateGroup(bad_id, metadata=_md(tenant))) == ["group.group_id"]
    for version in (-1, 0):
        delete = groups_pb2.DeleteGroupRequest(group_id=group.group_id, expected_version=version)
        assert await _invalid(stub.DeleteGroup(delete, metadata=_md(tenant))) == [
            "expected_version"
        ]

    unchanged = await client.groups.get(group.group_id)
    assert (unchanged.name, unchanged.version) == ("before", 1)

    # Without expected_version an update is unconditional (upstream's group
    # edits carry no version); an unknown group is NOT_FOUND, not a
    # precondition failure.
    updated = await stub.UpdateGroup(unguarded, metadata=_md(tenant))
    assert (updated.name, updated.version) == ("x", 2)
    unguarded.group.group_id = "NO-SUCH-GROUP"
    assert isinstance(await _error(stub.UpdateGroup(unguarded, metadata=_md(tenant))), pc.NotFound)


async def test_bad_member_lists(client: pc.AsyncPulseClient, db: Database, tenant: Tenant) -> None:
    await insert_rows(db, tenant.tenant_id, [row("K-1"), row("K-2")])
    group = await client.groups.create_static("s")
    cases: list[tuple[list[str], list[str]]] = [
        ([], ["device_ids"]),
        ([f"D-{n}" for n in range(1001)], ["device_ids"]),
        (["K-1", "bad id", ""], ["device_ids[1]", "device_ids[2]"]),
        (["K-1", "NOPE-1", "K-2", "NOPE-2"], ["device_ids[1]", "device_ids[3]"]),
    ]
    for ids, fields in cases:
        with pytest.raises(pc.InvalidArgument) as info:
            await client.groups.add_members(group.group_id, ids)
        assert [v.field for v in info.value.field_violations] == fields
    # Unknown devices refuse the whole request: K-1 and K-2 were not added.
    assert await client.groups.count_members(group.group_id) == 0
    with pytest.raises(pc.InvalidArgument):
        await client.groups.remove_members(group.group_id, [])


async def test_bad_listing_requests(
    client: pc.AsyncPulseClient, stub: groups_pb2_grpc.DeviceGroupServiceAsyncStub, tenant: Tenant
) -> None:
    md = _md(tenant)
    members = groups_pb2.ListGroupMembersRequest
    assert await _invalid(stub.ListGroupMembers(members(group_id="a b"), metadata=md)) == [
        "group_id"
    ]
    group = await client.groups.create_dynamic("g", {})
    negative = members(group_id=group.group_id, page_size=-1)
    assert await _invalid(stub.ListGroupMembers(negative, metadata=md)) == ["page_size"]
    assert await _invalid(
        stub.ListGroups(groups_pb2.ListGroupsRequest(page_size=-5), metadata=md)
    ) == ["page_size"]
    assert await _invalid(
        stub.ListGroups(groups_pb2.ListGroupsRequest(page_token="garbage"), metadata=md)
    ) == ["page_token"]
    preview = groups_pb2.PreviewFilterRequest(
        query_filter=filter_pb2.DeviceFilter(models=["ok", "m" * 129]), page_size=-1
    )
    assert await _invalid(stub.PreviewFilter(preview, metadata=md)) == [
        "query_filter.models[1]",
        "page_size",
    ]
    for call in (
        stub.GetGroup(groups_pb2.GetGroupRequest(group_id="NO-SUCH"), metadata=md),
        stub.ListGroupMembers(members(group_id="NO-SUCH"), metadata=md),
        stub.AddGroupMembers(
            groups_pb2.AddGroupMembersRequest(group_id="NO-SUCH", device_ids=["X"]), metadata=md
        ),
    ):
        error = await _error(call)
        assert isinstance(error, pc.NotFound), error
        assert (error.reason, error.metadata) == ("GROUP_NOT_FOUND", {"group": "NO-SUCH"})
