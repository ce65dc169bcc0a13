"""DeviceGroupService: parse and check the request, call the store, convert.

Every check happens before the first statement, so a refused request writes
nothing; the store's own refusals (version, kind, unknown devices) raise
inside the tenant transaction, which then rolls back.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import empty_pb2
from pulse.device.v1 import filter_pb2, groups_pb2, groups_pb2_grpc
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import filters, protoconv
from server import validation as v
from server.auth import current_principal
from server.db import Database
from server.errors import FailedPrecondition, FieldViolation, InvalidArgument
from server.groups import convert, store
from server.groups.membership_watch import MembershipWatches
from server.pagination import PageTokens, page_size

Context = grpc.aio.ServicerContext[Any, Any]
GroupType = groups_pb2.Group.GroupType

DESCRIPTION_MAX = 1024
MAX_DEVICE_IDS = 1000
MAX_TWIN_PATHS = 1000


def _check_name(field: str, value: str, out: list[FieldViolation]) -> None:
    if not value:
        out.append(FieldViolation(field, f"is required (1 to {v.NAME_MAX} characters)"))
    v.check_text(field, value, v.NAME_MAX, out)


def _required_filter(
    group: groups_pb2.Group, out: list[FieldViolation]
) -> filters.DeviceFilter | None:
    # Presence, not content: `"query_filter": {}` is the (valid) filter that
    # selects every active device; leaving it out is a mistake worth naming.
    if not group.HasField("query_filter"):
        out.append(
            FieldViolation(
                "group.query_filter",
                "is required for a dynamic group; {} selects every active device",
            )
        )
        return None
    return protoconv.parse_request_filter(group.query_filter, field="group.query_filter", out=out)


def _new_group_fields(group: groups_pb2.Group) -> dict[str, Any]:
    """CreateGroup's checked values, as store arguments."""
    out: list[FieldViolation] = []
    if group.group_id:
        v.check_id("group.group_id", group.group_id, out)
    _check_name("group.name", group.name, out)
    v.check_text("group.description", group.description, DESCRIPTION_MAX, out)
    kind = group.group_type
    if kind == GroupType.GROUP_TYPE_UNSPECIFIED:
        # Upstream creates static groups with only a name and description.
        kind = GroupType.DYNAMIC if group.HasField("query_filter") else GroupType.STATIC
    parsed: filters.DeviceFilter | None = None
    if kind == GroupType.DYNAMIC:
        parsed = _required_filter(group, out)
    elif kind == GroupType.STATIC:
        if group.HasField("query_filter"):
            out.append(
                FieldViolation("group.query_filter", "static groups have no filter; leave it unset")
            )
    else:
        out.append(FieldViolation("group.group_type", "must be STATIC or DYNAMIC"))
    v.raise_if(out)
    return {
        "group_id": group.group_id or str(uuid.uuid4()),
        "name": group.name,
        "description": group.description,
        "group_type": GroupType.Name(kind),
        "query_filter": filters.canonical_json(parsed) if parsed is not None else None,
    }


def _update_fields(request: groups_pb2.UpdateGroupRequest) -> dict[str, Any]:
    """UpdateGroup's checked changes: update_mask path -> store value."""
    out: list[FieldViolation] = []
    paths = list(dict.fromkeys(request.update_mask.paths))
    allowed = ", ".join(store.UPDATABLE)
    if not paths:
        out.append(FieldViolation("update_mask", f"name at least one of: {allowed}"))
    for path in paths:
        if path not in store.UPDATABLE:
            out.append(
                FieldViolation(
                    "update_mask.paths", f"{path!r} cannot be updated; allowed: {allowed}"
                )
            )
    if request.HasField("expected_version") and request.expected_version < 1:
        out.append(FieldViolation("expected_version", "must be a version you read (1 or more)"))
    group = request.group
    changes: dict[str, Any] = {}
    if "name" in paths:
        _check_name("group.name", group.name, out)
        changes["name"] = group.name
    if "description" in paths:
        v.check_text("group.description", group.description, DESCRIPTION_MAX, out)
        changes["description"] = group.description
    if "query_filter" in paths:
        parsed = _required_filter(group, out)
        if parsed is not None:
            changes["query_filter"] = filters.canonical_json(parsed)
    v.raise_if(out)
    return changes


def _device_ids(values: list[str]) -> list[str]:
    out: list[FieldViolation] = []
    if not values:
        out.append(FieldViolation("device_ids", "name at least one device"))
    elif len(values) > MAX_DEVICE_IDS:
        out.append(FieldViolation("device_ids", f"has {len(values)} ids; at most {MAX_DEVICE_IDS}"))
    else:
        for i, device_id in enumerate(values):
            v.check_id(f"device_ids[{i}]", device_id, out)
    v.raise_if(out)
    return list(dict.fromkeys(values))


def _static_only(group: store.GroupRecord) -> None:
    if group.group_type != store.STATIC:
        raise FailedPrecondition(
            f"group {group.group_id!r} is dynamic: its members are the devices its "
            "filter selects; change the filter instead",
            reason=ErrorReason.GROUP_NOT_STATIC,
            metadata={"group": group.group_id},
            subject=f"device-groups/{group.group_id}",
        )


class DeviceGroupService(groups_pb2_grpc.DeviceGroupServiceServicer):
    def __init__(
        self,
        db: Database,
        tokens: PageTokens,
        *,
        memberships: MembershipWatches,
        stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER,
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._memberships = memberships
        # The twin sync rule's threshold (PULSE_TWIN_STALE_AFTER_S), for
        # filters on sync status.
        self._stale_after = stale_after

    async def CreateGroup(
        self, request: groups_pb2.CreateGroupRequest, context: Context
    ) -> groups_pb2.Group:
        tenant = current_principal().tenant_id
        fields = _new_group_fields(request.group)
        async with self._db.tenant(tenant) as con:
            record = await store.create_group(con, tenant, **fields)
        return convert.group(await self._counted(tenant, record))

    async def _counted(self, tenant: uuid.UUID, record: store.GroupRecord) -> store.GroupRecord:
        """`record` with its member count, read after the write committed:
        creating a dynamic group or editing its filter holds the lock that
        every device write of the tenant waits for (migrations/0009) until
        commit, and counting a filter evaluated whole can take seconds."""
        async with self._db.tenant(tenant, readonly=True) as con:
            return await store.with_member_count(con, tenant, record, stale_after=self._stale_after)

    async def GetGroup(
        self, request: groups_pb2.GetGroupRequest, context: Context
    ) -> groups_pb2.Group:
        tenant = current_principal().tenant_id
        group_id = v.require_id("group_id", request.group_id)
        async with self._db.tenant(tenant, readonly=True) as con:
            record = await store.get_group(con, tenant, group_id)
            record = await store.with_member_count(
                con, tenant, record, stale_after=self._stale_after
            )
        return convert.group(record)

    async def ListGroups(
        self, request: groups_pb2.ListGroupsRequest, context: Context
    ) -> groups_pb2.ListGroupsResponse:
        tenant = current_principal().tenant_id
        size = page_size(request.page_size)
        listing = self._tokens.listing("groups", tenant)
        start = listing.start(request.page_token)
        after = (str(start[0]), str(start[1])) if start is not None else None
        async with self._db.tenant(tenant, readonly=True) as con:
            rows = await store.list_groups(con, tenant, after=after, limit=size + 1)
            rows, token = listing.page(rows, size, key=lambda g: [g.name, g.group_id])
            records = [
                await store.with_member_count(con, tenant, r, stale_after=self._stale_after)
                for r in rows
            ]
            total = await store.count_groups(con, tenant)
        return groups_pb2.ListGroupsResponse(
            groups=[convert.group(r) for r in records],
            next_page_token=token,
            total=convert.count(total),
        )

    async def UpdateGroup(
        self, request: groups_pb2.UpdateGroupRequest, context: Context
    ) -> groups_pb2.Group:
        tenant = current_principal().tenant_id
        group_id = v.require_id("group.group_id", request.group.group_id)
        changes = _update_fields(request)
        async with self._db.tenant(tenant) as con:
            current = await store.get_group(con, tenant, group_id)
            if "query_filter" in changes and current.group_type != store.DYNAMIC:
                raise FailedPrecondition(
                    f"group {group_id!r} is static and has no filter; "
                    "change its members with AddGroupMembers and RemoveGroupMembers",
                    reason=ErrorReason.GROUP_NOT_DYNAMIC,
                    metadata={"group": group_id},
                    subject=f"device-groups/{group_id}",
                )
            record = await store.update_group(
                con,
                tenant,
                group_id,
                expected_version=(
                    request.expected_version if request.HasField("expected_version") else None
                ),
                changes=changes,
            )
        return convert.group(await self._counted(tenant, record))

    async def DeleteGroup(
        self, request: groups_pb2.DeleteGroupRequest, context: Context
    ) -> empty_pb2.Empty:
        tenant = current_principal().tenant_id
        group_id = v.require_id("group_id", request.group_id)
        expected: int | None = None
        if request.HasField("expected_version"):
            if request.expected_version < 1:
                raise InvalidArgument.single(
                    "expected_version", "must be a version you read (1 or more)"
                )
            expected = request.expected_version
        async with self._db.tenant(tenant) as con:
            await store.delete_group(con, tenant, group_id, expected_version=expected)
        return empty_pb2.Empty()

    async def ListGroupMembers(
        self, request: groups_pb2.ListGroupMembersRequest, context: Context
    ) -> groups_pb2.ListGroupMembersResponse:
        tenant = current_principal().tenant_id
        group_id = v.require_id("group_id", request.group_id)
        size = page_size(request.page_size)
        listing = self._tokens.listing("group-members", tenant, group_id)
        after = _after_device(listing.start(request.page_token))
        async with self._db.tenant(tenant, readonly=True) as con:
            group = await store.get_group(con, tenant, group_id)
            rows = await store.list_members(
                con, tenant, group, after=after, limit=size + 1, stale_after=self._stale_after
            )
            total = (
                await store.count_members(con, tenant, group, stale_after=self._stale_after)
                if request.include_total
                else None
            )
        members, token = listing.page(rows, size, key=lambda m: [m.device_id])
        response = groups_pb2.ListGroupMembersResponse(
            group_id=group.group_id,
            group_type=GroupType.Value(group.group_type),
            members=[convert.member(m) for m in members],
            next_page_token=token,
        )
        if total is not None:
            response.total = convert.count(total)
        return response

    async def AddGroupMembers(
        self, request: groups_pb2.AddGroupMembersRequest, context: Context
    ) -> groups_pb2.Group:
        tenant = current_principal().tenant_id
        group_id = v.require_id("group_id", request.group_id)
        device_ids = _device_ids(list(request.device_ids))
        async with self._db.tenant(tenant) as con:
            group = await store.get_group(con, tenant, group_id, lock=True)
            _static_only(group)
            await store.add_members(con, tenant, group_id, device_ids)
            group = await store.with_member_count(con, tenant, group, stale_after=self._stale_after)
        return convert.group(group)

    async def RemoveGroupMembers(
        self, request: groups_pb2.RemoveGroupMembersRequest, context: Context
    ) -> groups_pb2.Group:
        tenant = current_principal().tenant_id
        group_id = v.require_id("group_id", request.group_id)
        device_ids = _device_ids(list(request.device_ids))
        async with self._db.tenant(tenant) as con:
            group = await store.get_group(con, tenant, group_id, lock=True)
            _static_only(group)
            await store.remove_members(con, tenant, group_id, device_ids)
            group = await store.with_member_count(con, tenant, group, stale_after=self._stale_after)
        return convert.group(group)

    async def PreviewFilter(
        self, request: groups_pb2.PreviewFilterRequest, context: Context
    ) -> groups_pb2.PreviewFilterResponse:
        tenant = current_principal().tenant_id
        out: list[FieldViolation] = []
        # Unset previews the empty filter: every active device.
        message = request.query_filter if request.HasField("query_filter") else None
        parsed = protoconv.parse_request_filter(
            message or filter_pb2.DeviceFilter(), field="query_filter", out=out
        )
        size = 0
        try:
            size = page_size(request.page_size)
        except InvalidArgument as e:  # reported together with the filter's problems
            out.extend(e.violations)
        v.raise_if(out)
        assert parsed is not None
        listing = self._tokens.listing("filter-preview", tenant, filters.canonical_text(parsed))
        after = _after_device(listing.start(request.page_token))
        async with self._db.tenant(tenant, readonly=True) as con:
            rows = await store.list_filter_members(
                con, tenant, parsed, after=after, limit=size + 1, stale_after=self._stale_after
            )
            total = (
                await store.count_filter_members(con, tenant, parsed, stale_after=self._stale_after)
                if request.include_total
                else None
            )
        members, token = listing.page(rows, size, key=lambda m: [m.device_id])
        response = groups_pb2.PreviewFilterResponse(
            members=[convert.member(m) for m in members],
            next_page_token=token,
            query_filter=protoconv.filter_message(filters.canonical_json(parsed)),
        )
        if total is not None:
            response.total = convert.count(total)
        return response

    async def ListDeviceGroups(
        self, request: groups_pb2.ListDeviceGroupsRequest, context: Context
    ) -> groups_pb2.ListDeviceGroupsResponse:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        async with self._db.tenant(tenant, readonly=True) as con:
            records = await store.device_groups(
                con, tenant, device_id, stale_after=self._stale_after
            )
        return groups_pb2.ListDeviceGroupsResponse(
            device_id=device_id,
            # member_count stays 0: counting every group would cost a count
            # per group, which this call exists to avoid.
            groups=[convert.group(r) for r in records],
        )

    async def WatchGroupMembership(
        self, request: groups_pb2.WatchGroupMembershipRequest, context: Context
    ) -> AsyncIterator[groups_pb2.WatchGroupMembershipResponse]:
        tenant = current_principal().tenant_id
        group_id = v.require_id("group_id", request.group_id)
        resume = None
        if request.resume_cursor:
            resume = self._memberships.source.open_cursor(tenant, group_id, request.resume_cursor)
        # Fail fast on an unknown group, before the stream starts.
        async with self._db.tenant(tenant, readonly=True) as con:
            await store.get_group(con, tenant, group_id)
        async for message in self._memberships.watch(tenant, group_id, resume):
            yield message

    async def ListTwinPaths(
        self, request: groups_pb2.ListTwinPathsRequest, context: Context
    ) -> groups_pb2.ListTwinPathsResponse:
        tenant = current_principal().tenant_id
        if request.document not in (
            filter_pb2.TwinCondition.DESIRED,
            filter_pb2.TwinCondition.REPORTED,
        ):
            raise InvalidArgument.single("document", "is required: DESIRED or REPORTED")
        document = filter_pb2.TwinCondition.Document.Name(request.document)
        async with self._db.tenant(tenant, readonly=True) as con:
            documents = await store.sample_twin_documents(
                con, tenant, filters.TwinDocument(document)
            )
        return groups_pb2.ListTwinPathsResponse(
            document=request.document,
            paths=filters.twin_paths(documents, limit=MAX_TWIN_PATHS),
        )


def _after_device(start: list[object] | None) -> str:
    """The last device_id of the previous page, or "" for the first page."""
    return "" if start is None else str(start[0])
