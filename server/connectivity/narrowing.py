"""Which events a watcher wants: device ids, event types, a device group.

Device ids and event types are fixed for the life of a stream. A group is
re-read with every batch of events (`load_group`), so a change to a dynamic
group's filter or a static group's members applies to the next event, and a
dynamic group's filter is evaluated against each device as its event
arrives, with the status the event gave it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from server import filters
from server.connectivity.model import EventRecord
from server.db import Connection
from server.groups import store as groups_store


@dataclass(frozen=True, slots=True)
class GroupView:
    """A group as one read saw it: a dynamic group's filter, or None for a static one."""

    group_id: str
    filter: filters.DeviceFilter | None
    #: The twin sync rule's threshold, for filters on sync status.
    stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER

    @property
    def static(self) -> bool:
        return self.filter is None

    @property
    def reads_twin(self) -> bool:
        """Whether evaluating it needs the devices' twins read with the events."""
        return self.filter is not None and self.filter.reads_twin

    def contains(self, event: EventRecord) -> bool:
        device = event.device
        if device is None:  # the device row is gone: it belongs to no group
            return False
        if self.filter is None:
            return self.group_id in device.static_groups
        return filters.matches(
            self.filter,
            filters.DeviceRow(
                device_id=event.device_id,
                name=device.name,
                site_id=device.site_id,
                model=device.model,
                tags=device.tags,
                lifecycle=device.lifecycle,
                # As of the event, not as of the read: a watcher of "offline
                # devices" sees the event that took a device offline.
                status=event.status,
                last_seen_at=device.last_seen_at,
                **(device.twin or {}),
            ),
            stale_after=self.stale_after,
        )


async def load_group(
    con: Connection,
    tenant_id: uuid.UUID,
    group_id: str,
    *,
    stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER,
) -> GroupView:
    """The group's current definition; NotFound if it does not exist (any more)."""
    record = await groups_store.get_group(con, tenant_id, group_id)
    if record.query_filter is None:
        return GroupView(group_id, None)
    # The stored filter is canonical_json output, hence valid parse input.
    return GroupView(group_id, filters.parse_filter(record.query_filter), stale_after)


@dataclass(frozen=True, slots=True)
class Narrowing:
    """A stream's conditions; all that are set must hold."""

    device_ids: frozenset[str] = frozenset()
    event_types: frozenset[str] = frozenset()
    group_id: str | None = None

    def accepts(self, event: EventRecord, group: GroupView | None) -> bool:
        """Whether to deliver `event`; `group` is the current view of group_id."""
        if self.device_ids and event.device_id not in self.device_ids:
            return False
        if self.event_types and event.event_type not in self.event_types:
            return False
        if self.group_id is None:
            return True
        return group is not None and group.contains(event)
