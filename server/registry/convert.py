"""Records to protos and back; no rules, no I/O."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from pulse.device.v1 import devices_pb2, status_pb2

from server.registry.store import DeviceRecord, SiteRecord


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(doc)
    return out


def to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def device(record: DeviceRecord) -> devices_pb2.Device:
    return devices_pb2.Device(
        device_id=record.device_id,
        name=record.name,
        site_id=record.site_id or "",
        model=record.model,
        tags=record.tags,
        metadata=struct(record.metadata),
        lifecycle_status=status_pb2.LifecycleStatus.Value(record.lifecycle),
        connectivity_status=status_pb2.ConnectivityStatus.Value(record.status),
        last_seen_time=timestamp(record.last_seen_at),
        create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
    )


def site(record: SiteRecord) -> devices_pb2.Site:
    return devices_pb2.Site(
        site_id=record.site_id, name=record.name, create_time=timestamp(record.created_at)
    )
