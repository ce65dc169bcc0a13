"""A twin's sync status: how far a device is from what was asked of it."""

from __future__ import annotations

import enum
from datetime import datetime, timedelta


class SyncStatus(enum.Enum):
    SYNCED = "SYNCED"
    PENDING = "PENDING"
    STALE = "STALE"


def sync_status(
    *,
    desired_version: int,
    reported_version: int,
    in_sync: bool,
    connectivity: str,
    desired_updated_at: datetime | None,
    reported_updated_at: datetime | None,
    now: datetime,
    stale_after: timedelta,
) -> SyncStatus:
    """SYNCED, PENDING or STALE.

    SYNCED needs both the acknowledgement and equal documents: a device that
    acknowledged the version but reports other values did not manage to apply
    it. SYNCED wins over connectivity, since the last report is still what
    the device holds; an offline device that is behind, though, will not
    catch up by itself, so it is STALE at once rather than after the timeout.
    The timeout runs from the last desired write (or, for a twin never
    written, from the device's last report).
    """
    if reported_version == desired_version and in_sync:
        return SyncStatus.SYNCED
    if connectivity != "ONLINE":
        return SyncStatus.STALE
    since = desired_updated_at or reported_updated_at
    if since is not None and now - since > stale_after:
        return SyncStatus.STALE
    return SyncStatus.PENDING
