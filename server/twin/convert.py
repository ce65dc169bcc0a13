"""Twin records to protos; the delta and sync status are computed here, on
the way out, from the two documents (they are never stored)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import field_mask_pb2
from pulse.device.v1 import status_pb2, twin_pb2

from server.protoconv import struct, timestamp, value
from server.twin.delta import Delta, compute_delta, flat_delta
from server.twin.store import TwinRecord
from server.twin.sync import sync_status


def delta(result: Delta, *, desired_version: int, reported_version: int) -> twin_pb2.TwinDelta:
    message = twin_pb2.TwinDelta(
        unchanged_count=result.unchanged_count,
        in_sync=result.in_sync,
        desired_version=desired_version,
        reported_version=reported_version,
    )
    for path, item in result.added.items():
        message.added[path].CopyFrom(value(item))
    for path, item in result.removed.items():
        message.removed[path].CopyFrom(value(item))
    for path, change in result.changed.items():
        message.changed[path].CopyFrom(
            twin_pb2.ValueChange(
                old_value=value(change["old_value"]), new_value=value(change["new_value"])
            )
        )
    return message


def twin_delta(record: TwinRecord) -> twin_pb2.TwinDelta:
    """GetTwinDelta's answer: the delta, named by its device, with the
    legacy flat delta beside it (a Twin carries both itself)."""
    message = delta(
        compute_delta(record.desired, record.reported),
        desired_version=record.desired_version,
        reported_version=record.reported_version,
    )
    message.device_id = record.device_id
    message.delta.CopyFrom(struct(flat_delta(record.desired, record.reported)))
    return message


#: The fields a partial Twin (`read_mask`) fills without the delta.
_PLAIN: dict[str, Callable[[TwinRecord], Any]] = {
    "device_id": lambda r: r.device_id,
    "desired": lambda r: struct(r.desired),
    "reported": lambda r: struct(r.reported),
    "desired_version": lambda r: r.desired_version,
    "reported_version": lambda r: r.reported_version,
    "desired_update_time": lambda r: timestamp(r.desired_updated_at),
    "reported_update_time": lambda r: timestamp(r.reported_updated_at),
    "connectivity_status": lambda r: status_pb2.ConnectivityStatus.Value(r.status),
    "revision": lambda r: r.revision,
}
#: Every field of a Twin a `read_mask` may name.
TWIN_FIELDS = frozenset(twin_pb2.Twin.DESCRIPTOR.fields_by_name)


def partial_twin(
    record: TwinRecord, fields: frozenset[str], *, now: datetime, stale_after: timedelta
) -> twin_pb2.Twin:
    """A Twin with only `fields` (names in TWIN_FIELDS) filled; the delta and
    the sync status are computed only when one of them needs it."""
    if fields <= _PLAIN.keys():
        return twin_pb2.Twin(**{name: _PLAIN[name](record) for name in fields})
    partial = twin_pb2.Twin()
    field_mask_pb2.FieldMask(paths=sorted(fields)).MergeMessage(
        twin(record, now=now, stale_after=stale_after), partial
    )
    return partial


def twin(record: TwinRecord, *, now: datetime, stale_after: timedelta) -> twin_pb2.Twin:
    result = compute_delta(record.desired, record.reported)
    status = sync_status(
        desired_version=record.desired_version,
        reported_version=record.reported_version,
        in_sync=result.in_sync,
        connectivity=record.status,
        desired_updated_at=record.desired_updated_at,
        reported_updated_at=record.reported_updated_at,
        now=now,
        stale_after=stale_after,
    )
    return twin_pb2.Twin(
        device_id=record.device_id,
        desired=struct(record.desired),
        reported=struct(record.reported),
        desired_version=record.desired_version,
        reported_version=record.reported_version,
        sync_status=twin_pb2.Twin.SyncStatus.Value(status.value),
        desired_update_time=timestamp(record.desired_updated_at),
        reported_update_time=timestamp(record.reported_updated_at),
        structured_delta=delta(
            result,
            desired_version=record.desired_version,
            reported_version=record.reported_version,
        ),
        delta=struct(flat_delta(record.desired, record.reported)),
        connectivity_status=status_pb2.ConnectivityStatus.Value(record.status),
        revision=record.revision,
    )
