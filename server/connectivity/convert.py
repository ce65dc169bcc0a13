"""Records to protos and back; no rules, no I/O."""

from __future__ import annotations

from pulse.device.v1 import connectivity_pb2, status_pb2

from server.connectivity.model import EventRecord
from server.protoconv import struct, timestamp

EVENT_TYPE_NAMES: dict[int, str] = {
    int(v): k
    for k, v in connectivity_pb2.ConnectionEventType.items()
    if v != connectivity_pb2.CONNECTION_EVENT_TYPE_UNSPECIFIED
}


def _details(record: EventRecord) -> dict[str, object]:
    """The stored details, with what upstream's clients read there: the
    trigger (in its JSON spelling, which is how it is stored) and the status
    before the event."""
    return {"trigger": record.trigger, "previous_status": record.previous_status, **record.details}


def event(record: EventRecord) -> connectivity_pb2.ConnectionEvent:
    return connectivity_pb2.ConnectionEvent(
        id=record.event_id,
        tenant_id=str(record.tenant_id),
        device_id=record.device_id,
        event_type=connectivity_pb2.ConnectionEventType.Value(record.event_type),
        timestamp=timestamp(record.occurred_at),
        previous_status=status_pb2.ConnectivityStatus.Value(record.previous_status),
        status=status_pb2.ConnectivityStatus.Value(record.status),
        # Stored lower_snake as upstream wrote it; the enum is its UPPER form.
        trigger=connectivity_pb2.ConnectionTrigger.Value(record.trigger.upper()),
        details=struct(_details(record)),
    )
