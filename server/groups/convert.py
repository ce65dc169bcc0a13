"""Group records to protos and request filters to parsed ones; no I/O."""

from __future__ import annotations

from pulse.device.v1 import groups_pb2, status_pb2

from server import protoconv
from server.groups.store import GroupRecord, MemberRecord
from server.protoconv import timestamp

# member_count and total are int32 so that JSON carries numbers, as upstream's
# did; a group larger than this is reported as this.
INT32_MAX = 2**31 - 1


def count(value: int) -> int:
    return min(value, INT32_MAX)


def group(record: GroupRecord) -> groups_pb2.Group:
    message = groups_pb2.Group(
        group_id=record.group_id,
        name=record.name,
        description=record.description,
        group_type=groups_pb2.Group.GroupType.Value(record.group_type),
        member_count=count(record.member_count),
        version=record.version,
        create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
    )
    if record.query_filter is not None:
        # CopyFrom marks the field present even for the empty filter, so a
        # dynamic group that selects every active device still has one.
        message.query_filter.CopyFrom(protoconv.filter_message(record.query_filter))
        message.query_filter.SetInParent()
    return message


def member(record: MemberRecord) -> groups_pb2.GroupMember:
    status = (
        status_pb2.ConnectivityStatus.Value(record.status)
        if record.status
        else status_pb2.CONNECTIVITY_STATUS_UNSPECIFIED
    )
    return groups_pb2.GroupMember(
        device_id=record.device_id,
        name=record.name,
        status=status,
        site_id=record.site_id or "",
    )
