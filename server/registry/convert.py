"""Device and site records to protos; no rules, no I/O."""

from __future__ import annotations

from pulse.device.v1 import devices_pb2, status_pb2

from server.protoconv import struct, timestamp
from server.registry.store import DeviceRecord, SiteRecord


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
