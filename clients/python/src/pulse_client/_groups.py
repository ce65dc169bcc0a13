"""Device groups (``pulse.device.v1.DeviceGroupService``).

A group is static (explicit members) or dynamic (a saved filter whose members
are computed on every read). Requests are built once, by the module-level
builders, and sent by the thin async (``AsyncGroups``) and sync (``Groups``)
wrappers, which differ only in how they call the RPC helper.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias

from google.protobuf import field_mask_pb2, json_format
from pulse.device.v1 import filter_pb2, groups_pb2, groups_pb2_grpc

from ._membership import AsyncMembershipWatch, MembershipWatch
from ._membership import request as membership_request
from ._pages import AsyncPager, Pager
from ._rpc import AsyncRpc, AsyncStream, Rpc, Stream

__all__ = ["AsyncGroups", "FilterLike", "Groups"]

FilterLike: TypeAlias = filter_pb2.DeviceFilter | Mapping[str, object]
"""A DeviceFilter message, or its protobuf-JSON form such as the upstream
``{"status": "ONLINE", "tags": ["production"], "site_id": "site-01"}``."""

_GroupType = groups_pb2.Group.GroupType


def device_filter(value: FilterLike) -> filter_pb2.DeviceFilter:
    """The message for a filter given either way.

    Raises:
        google.protobuf.json_format.ParseError: A mapping that is not valid
            DeviceFilter JSON (unknown field, unknown status name, ...).
    """
    if isinstance(value, filter_pb2.DeviceFilter):
        return value
    return json_format.ParseDict(dict(value), filter_pb2.DeviceFilter())


def create_dynamic_request(
    name: str, query_filter: FilterLike, *, description: str, group_id: str
) -> groups_pb2.CreateGroupRequest:
    group = groups_pb2.Group(
        group_id=group_id, name=name, description=description, group_type=_GroupType.DYNAMIC
    )
    # CopyFrom keeps the field present even for the empty filter (every device).
    group.query_filter.CopyFrom(device_filter(query_filter))
    group.query_filter.SetInParent()
    return groups_pb2.CreateGroupRequest(group=group)


def create_static_request(
    name: str, *, description: str, group_id: str
) -> groups_pb2.CreateGroupRequest:
    group = groups_pb2.Group(
        group_id=group_id, name=name, description=description, group_type=_GroupType.STATIC
    )
    return groups_pb2.CreateGroupRequest(group=group)


def update_group_request(
    group_id: str,
    *,
    expected_version: int,
    name: str | None,
    description: str | None,
    query_filter: FilterLike | None,
) -> groups_pb2.UpdateGroupRequest:
    group = groups_pb2.Group(group_id=group_id)
    given: list[str] = []
    if name is not None:
        group.name = name
        given.append("name")
    if description is not None:
        group.description = description
        given.append("description")
    if query_filter is not None:
        group.query_filter.CopyFrom(device_filter(query_filter))
        group.query_filter.SetInParent()
        given.append("query_filter")
    if not given:
        # The server refuses an empty update_mask; failing here names the mistake.
        raise ValueError("update() needs at least one of name, description, query_filter")
    return groups_pb2.UpdateGroupRequest(
        group=group,
        update_mask=field_mask_pb2.FieldMask(paths=given),
        expected_version=expected_version,
    )


def delete_group_request(
    group_id: str, expected_version: int | None
) -> groups_pb2.DeleteGroupRequest:
    request = groups_pb2.DeleteGroupRequest(group_id=group_id)
    if expected_version is not None:
        request.expected_version = expected_version
    return request


def list_members_request(
    group_id: str, page_size: int, page_token: str, *, include_total: bool = False
) -> groups_pb2.ListGroupMembersRequest:
    return groups_pb2.ListGroupMembersRequest(
        group_id=group_id, page_size=page_size, page_token=page_token, include_total=include_total
    )


def preview_request(
    query_filter: FilterLike, page_size: int, page_token: str, *, include_total: bool = False
) -> groups_pb2.PreviewFilterRequest:
    return groups_pb2.PreviewFilterRequest(
        query_filter=device_filter(query_filter),
        page_size=page_size,
        page_token=page_token,
        include_total=include_total,
    )


def _groups_of(response: groups_pb2.ListGroupsResponse) -> Sequence[groups_pb2.Group]:
    return response.groups


def _members_of(
    response: groups_pb2.ListGroupMembersResponse | groups_pb2.PreviewFilterResponse,
) -> Sequence[groups_pb2.GroupMember]:
    return response.members


class AsyncGroups:
    """Device groups of the caller's tenant (``client.groups``)."""

    def __init__(self, rpc: AsyncRpc) -> None:
        self._rpc = rpc
        self._stub = groups_pb2_grpc.DeviceGroupServiceStub(rpc.channel)

    async def create_dynamic(
        self, name: str, query_filter: FilterLike, *, description: str = "", group_id: str = ""
    ) -> groups_pb2.Group:
        """Creates a group whose members are the devices ``query_filter`` selects.

        Args:
            name: The group's name (required).
            query_filter: The filter; ``{}`` selects every active device.
            description: Free text.
            group_id: The id to use; empty lets the server assign one.
        """
        request = create_dynamic_request(
            name, query_filter, description=description, group_id=group_id
        )
        return await self._rpc.unary(self._stub.CreateGroup, request)

    async def create_static(
        self, name: str, *, description: str = "", group_id: str = ""
    ) -> groups_pb2.Group:
        """Creates an empty group of explicit members (see :meth:`add_members`)."""
        request = create_static_request(name, description=description, group_id=group_id)
        return await self._rpc.unary(self._stub.CreateGroup, request)

    async def create(self, group: groups_pb2.Group) -> groups_pb2.Group:
        """Creates a group from a Group message, e.g. one parsed from JSON.

        A group with a ``query_filter`` is dynamic; a static one needs
        ``group_type`` STATIC.
        """
        request = groups_pb2.CreateGroupRequest(group=group)
        return await self._rpc.unary(self._stub.CreateGroup, request)

    async def get(self, group_id: str) -> groups_pb2.Group:
        """Returns one group with its current member count; NotFound if absent."""
        request = groups_pb2.GetGroupRequest(group_id=group_id)
        return await self._rpc.unary(self._stub.GetGroup, request)

    def list(self, *, page_size: int = 0) -> AsyncPager[groups_pb2.Group]:
        """Groups in name order, with member counts, fetched lazily page by page."""

        async def fetch(token: str) -> groups_pb2.ListGroupsResponse:
            return await self.list_page(
                groups_pb2.ListGroupsRequest(page_size=page_size, page_token=token)
            )

        return AsyncPager(fetch, _groups_of)

    async def list_page(
        self, request: groups_pb2.ListGroupsRequest
    ) -> groups_pb2.ListGroupsResponse:
        """One raw ListGroups call, for callers that handle page tokens themselves."""
        return await self._rpc.unary(self._stub.ListGroups, request)

    async def update(
        self,
        group_id: str,
        *,
        expected_version: int,
        name: str | None = None,
        description: str | None = None,
        query_filter: FilterLike | None = None,
    ) -> groups_pb2.Group:
        """Changes exactly the fields passed, if the group is still at ``expected_version``.

        Raises:
            VersionConflict: The group changed since that version was read;
                ``current_version`` says what it is now.
            ValueError: No field was passed.
        """
        request = update_group_request(
            group_id,
            expected_version=expected_version,
            name=name,
            description=description,
            query_filter=query_filter,
        )
        return await self._rpc.unary(self._stub.UpdateGroup, request)

    async def delete(self, group_id: str, *, expected_version: int | None = None) -> None:
        """Deletes a group; with ``expected_version``, only if it is still at it."""
        request = delete_group_request(group_id, expected_version)
        await self._rpc.unary(self._stub.DeleteGroup, request)

    def members(self, group_id: str, *, page_size: int = 0) -> AsyncPager[groups_pb2.GroupMember]:
        """The group's members in device_id order, resolved as each page is fetched."""

        async def fetch(token: str) -> groups_pb2.ListGroupMembersResponse:
            return await self.members_page(list_members_request(group_id, page_size, token))

        return AsyncPager(fetch, _members_of)

    async def members_page(
        self, request: groups_pb2.ListGroupMembersRequest
    ) -> groups_pb2.ListGroupMembersResponse:
        """One raw ListGroupMembers call (e.g. with ``include_total``)."""
        return await self._rpc.unary(self._stub.ListGroupMembers, request)

    async def count_members(self, group_id: str) -> int:
        """How many devices are in the group right now."""
        request = list_members_request(group_id, 1, "", include_total=True)
        return (await self.members_page(request)).total

    async def add_members(self, group_id: str, device_ids: Iterable[str]) -> groups_pb2.Group:
        """Adds devices to a static group (members already in it are skipped)."""
        request = groups_pb2.AddGroupMembersRequest(group_id=group_id, device_ids=device_ids)
        return await self._rpc.unary(self._stub.AddGroupMembers, request)

    async def remove_members(self, group_id: str, device_ids: Iterable[str]) -> groups_pb2.Group:
        """Removes devices from a static group (non-members are skipped)."""
        request = groups_pb2.RemoveGroupMembersRequest(group_id=group_id, device_ids=device_ids)
        return await self._rpc.unary(self._stub.RemoveGroupMembers, request)

    def preview(
        self, query_filter: FilterLike, *, page_size: int = 0
    ) -> AsyncPager[groups_pb2.GroupMember]:
        """The devices an unsaved filter selects, in device_id order."""

        async def fetch(token: str) -> groups_pb2.PreviewFilterResponse:
            return await self.preview_page(preview_request(query_filter, page_size, token))

        return AsyncPager(fetch, _members_of)

    async def preview_page(
        self, request: groups_pb2.PreviewFilterRequest
    ) -> groups_pb2.PreviewFilterResponse:
        """One raw PreviewFilter call (e.g. with ``include_total``)."""
        return await self._rpc.unary(self._stub.PreviewFilter, request)

    async def device_groups(self, device_id: str) -> builtins.list[groups_pb2.Group]:
        """The groups a device is in right now, in name order (then group_id).

        Static groups that list it and dynamic groups whose filter selects it,
        evaluated against the device's current state. ``member_count`` is not
        computed here and is 0.

        Raises:
            NotFound: No such device.
        """
        request = groups_pb2.ListDeviceGroupsRequest(device_id=device_id)
        response = await self._rpc.unary(self._stub.ListDeviceGroups, request)
        return list(response.groups)

    async def twin_paths(self, document: str = "REPORTED") -> builtins.list[str]:
        """Paths to the values the fleet's ``document`` (``"REPORTED"`` or
        ``"DESIRED"``) holds, from a sample of devices, for a path picker."""
        request = groups_pb2.ListTwinPathsRequest(
            document=filter_pb2.TwinCondition.Document.Value(document)
        )
        response = await self._rpc.unary(self._stub.ListTwinPaths, request)
        return list(response.paths)

    def watch_membership(self, group_id: str, *, resume_cursor: str = "") -> AsyncMembershipWatch:
        """Devices entering and leaving ``group_id``, resuming by itself.

        Without ``resume_cursor`` it starts with the current members (as
        ENTERED, cause CURRENT_MEMBER); with one, after that cursor. Raises
        NotFound when the group does not exist or is deleted while watched.
        """

        def open_stream(cursor: str) -> AsyncStream[groups_pb2.WatchGroupMembershipResponse]:
            return self._rpc.stream(
                self._stub.WatchGroupMembership, membership_request(group_id, cursor)
            )

        return AsyncMembershipWatch(open_stream, resume_cursor)


class Groups:
    """Blocking twin of :class:`AsyncGroups` (``PulseClient.groups``)."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = groups_pb2_grpc.DeviceGroupServiceStub(rpc.channel)

    def create_dynamic(
        self, name: str, query_filter: FilterLike, *, description: str = "", group_id: str = ""
    ) -> groups_pb2.Group:
        """Creates a dynamic group; see :meth:`AsyncGroups.create_dynamic`."""
        request = create_dynamic_request(
            name, query_filter, description=description, group_id=group_id
        )
        return self._rpc.unary(self._stub.CreateGroup, request)

    def create_static(
        self, name: str, *, description: str = "", group_id: str = ""
    ) -> groups_pb2.Group:
        """Creates an empty static group."""
        request = create_static_request(name, description=description, group_id=group_id)
        return self._rpc.unary(self._stub.CreateGroup, request)

    def create(self, group: groups_pb2.Group) -> groups_pb2.Group:
        """Creates a group from a Group message; see :meth:`AsyncGroups.create`."""
        return self._rpc.unary(self._stub.CreateGroup, groups_pb2.CreateGroupRequest(group=group))

    def get(self, group_id: str) -> groups_pb2.Group:
        """Returns one group with its current member count; NotFound if absent."""
        return self._rpc.unary(self._stub.GetGroup, groups_pb2.GetGroupRequest(group_id=group_id))

    def list(self, *, page_size: int = 0) -> Pager[groups_pb2.Group]:
        """Groups in name order, with member counts, fetched lazily page by page."""

        def fetch(token: str) -> groups_pb2.ListGroupsResponse:
            return self.list_page(
                groups_pb2.ListGroupsRequest(page_size=page_size, page_token=token)
            )

        return Pager(fetch, _groups_of)

    def list_page(self, request: groups_pb2.ListGroupsRequest) -> groups_pb2.ListGroupsResponse:
        """One raw ListGroups call."""
        return self._rpc.unary(self._stub.ListGroups, request)

    def update(
        self,
        group_id: str,
        *,
        expected_version: int,
        name: str | None = None,
        description: str | None = None,
        query_filter: FilterLike | None = None,
    ) -> groups_pb2.Group:
        """Version-guarded update; see :meth:`AsyncGroups.update`."""
        request = update_group_request(
            group_id,
            expected_version=expected_version,
            name=name,
            description=description,
            query_filter=query_filter,
        )
        return self._rpc.unary(self._stub.UpdateGroup, request)

    def delete(self, group_id: str, *, expected_version: int | None = None) -> None:
        """Deletes a group; with ``expected_version``, only if it is still at it."""
        request = delete_group_request(group_id, expected_version)
        self._rpc.unary(self._stub.DeleteGroup, request)

    def members(self, group_id: str, *, page_size: int = 0) -> Pager[groups_pb2.GroupMember]:
        """The group's members in device_id order, resolved as each page is fetched."""

        def fetch(token: str) -> groups_pb2.ListGroupMembersResponse:
            return self.members_page(list_members_request(group_id, page_size, token))

        return Pager(fetch, _members_of)

    def members_page(
        self, request: groups_pb2.ListGroupMembersRequest
    ) -> groups_pb2.ListGroupMembersResponse:
        """One raw ListGroupMembers call."""
        return self._rpc.unary(self._stub.ListGroupMembers, request)

    def count_members(self, group_id: str) -> int:
        """How many devices are in the group right now."""
        request = list_members_request(group_id, 1, "", include_total=True)
        return self.members_page(request).total

    def add_members(self, group_id: str, device_ids: Iterable[str]) -> groups_pb2.Group:
        """Adds devices to a static group."""
        request = groups_pb2.AddGroupMembersRequest(group_id=group_id, device_ids=device_ids)
        return self._rpc.unary(self._stub.AddGroupMembers, request)

    def remove_members(self, group_id: str, device_ids: Iterable[str]) -> groups_pb2.Group:
        """Removes devices from a static group."""
        request = groups_pb2.RemoveGroupMembersRequest(group_id=group_id, device_ids=device_ids)
        return self._rpc.unary(self._stub.RemoveGroupMembers, request)

    def preview(
        self, query_filter: FilterLike, *, page_size: int = 0
    ) -> Pager[groups_pb2.GroupMember]:
        """The devices an unsaved filter selects, in device_id order."""

        def fetch(token: str) -> groups_pb2.PreviewFilterResponse:
            return self.preview_page(preview_request(query_filter, page_size, token))

        return Pager(fetch, _members_of)

    def preview_page(
        self, request: groups_pb2.PreviewFilterRequest
    ) -> groups_pb2.PreviewFilterResponse:
        """One raw PreviewFilter call."""
        return self._rpc.unary(self._stub.PreviewFilter, request)

    def device_groups(self, device_id: str) -> builtins.list[groups_pb2.Group]:
        """The groups a device is in right now; see :meth:`AsyncGroups.device_groups`."""
        request = groups_pb2.ListDeviceGroupsRequest(device_id=device_id)
        response = self._rpc.unary(self._stub.ListDeviceGroups, request)
        return list(response.groups)

    def twin_paths(self, document: str = "REPORTED") -> builtins.list[str]:
        """Paths in the fleet's twin documents; see :meth:`AsyncGroups.twin_paths`."""
        request = groups_pb2.ListTwinPathsRequest(
            document=filter_pb2.TwinCondition.Document.Value(document)
        )
        response = self._rpc.unary(self._stub.ListTwinPaths, request)
        return list(response.paths)

    def watch_membership(self, group_id: str, *, resume_cursor: str = "") -> MembershipWatch:
        """Devices entering and leaving ``group_id``; see :meth:`AsyncGroups.watch_membership`."""

        def open_stream(cursor: str) -> Stream[groups_pb2.WatchGroupMembershipResponse]:
            return self._rpc.stream(
                self._stub.WatchGroupMembership, membership_request(group_id, cursor)
            )

        return MembershipWatch(open_stream, resume_cursor)
