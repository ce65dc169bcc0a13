"""Values shared by the writers and readers of the connectivity log; no I/O."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

# Re-exported: the connectivity log is one of the logs event_log orders.
from server.event_log import START as START
from server.event_log import Position as Position

CHANNEL: Final = "pulse_connection_events"
"""NOTIFY channel; the payload is the tenant id of the committed events."""

EVENT_TYPES: Final = ("CONNECTED", "DISCONNECTED", "CONNECTION_LOST")

EVENT_WRITER_LOCK: Final = 0x70756C73_636F6E6E  # "pulsconn"
"""Advisory lock every transaction that may insert events takes, shared, as
its first statement, before it has a transaction id. Readers find the
writers still running through it: only those can still insert an event
before a reader's position (store.read_after)."""


class Signal(enum.StrEnum):
    """What one device message says about its connection."""

    #: Any message that is not a status: heartbeat, reported state, telemetry.
    ACTIVITY = "activity"
    ONLINE = "online"
    OFFLINE = "offline"
    #: The broker's last-will: any status payload but `online` and `offline`.
    WILL = "will"


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """The device columns a group filter looks at, read with the event."""

    name: str
    site_id: str | None
    model: str
    tags: dict[str, str]
    lifecycle: str
    last_seen_at: datetime | None
    #: Of the static groups the reader asked about, those the device is in.
    static_groups: frozenset[str] = frozenset()
    #: The twin's documents, versions and times, keyed as filters.DeviceRow's
    #: fields; read only for group filters with twin conditions.
    twin: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    event_id: int
    tenant_id: uuid.UUID
    device_id: str
    event_type: str
    occurred_at: datetime
    previous_status: str
    status: str
    trigger: str
    details: dict[str, Any]
    xact: int
    #: Only when the read asked for them (a watcher narrowed by a group).
    device: DeviceFacts | None = None

    @property
    def position(self) -> Position:
        return Position(self.xact, self.event_id)
