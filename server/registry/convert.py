"""Device and site records to protos; no rules, no I/O."""

from __future__ import annotations

import uuid

from pulse.device.v1 import devices_pb2, status_pb2

from server.broker_access.rules import device_username
from server.credentials.store import CredentialRecord
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


def credential(
    tenant_id: uuid.UUID, record: CredentialRecord, *, secret: str = ""
) -> devices_pb2.DeviceCredential:
    return devices_pb2.DeviceCredential(
        credential_id=record.credential_id,
        device_id=record.device_id,
        username=device_username(tenant_id, record.device_id, record.credential_id),
        secret=secret,
        create_time=timestamp(record.create_time),
        expire_time=timestamp(record.expire_time),
        last_used_time=timestamp(record.last_used_time),
        revoke_time=timestamp(record.revoke_time),
    )
