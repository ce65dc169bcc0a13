"""Why a device entered or left a group: pure rules, no I/O.

The maintainer re-evaluates a device after one or more changes (the kinds
queued by the triggers in migrations/0008), seeing only its state after all
of them. When that moves the device in or out of a group, the event names
the change that group's definition can actually see: a device whose tags and
twin both changed leaves a group filtered on tags because of TAGS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from server import filters

DEVICE_DELETED: Final = "DEVICE_DELETED"
DEVICE_CREATED: Final = "DEVICE_CREATED"
DEVICE_DECOMMISSIONED: Final = "DEVICE_DECOMMISSIONED"
GROUP_EDIT: Final = "GROUP_EDIT"
STATUS: Final = "STATUS"
TAGS: Final = "TAGS"
TWIN: Final = "TWIN"
ATTRIBUTES: Final = "ATTRIBUTES"
LAST_SEEN: Final = "LAST_SEEN"
SYNC_TIMEOUT: Final = "SYNC_TIMEOUT"

#: Most telling first. Creation comes last: a device created and then given
#: a desired state in one evaluation entered a group of configured devices
#: because of its twin, not because it exists.
PRIORITY: Final = (
    DEVICE_DELETED,
    DEVICE_DECOMMISSIONED,
    GROUP_EDIT,
    STATUS,
    TAGS,
    TWIN,
    ATTRIBUTES,
    LAST_SEEN,
    SYNC_TIMEOUT,
    DEVICE_CREATED,
)
_RANK: Final = {cause: i for i, cause in enumerate(PRIORITY)}

_ALWAYS: Final = frozenset({DEVICE_DELETED, DEVICE_CREATED, GROUP_EDIT})


def sensitive_to(f: filters.DeviceFilter | None) -> frozenset[str]:
    """The kinds of change that can move a device in or out of a group with
    filter `f` (None: a static group, which only its member list moves)."""
    if f is None:
        return _ALWAYS
    kinds = set(_ALWAYS)
    kinds.add(ATTRIBUTES)  # name, site, model, and lifecycle back to ACTIVE
    if not f.include_decommissioned:
        kinds.add(DEVICE_DECOMMISSIONED)
    if f.statuses or f.sync_statuses:  # sync status depends on connectivity
        kinds.add(STATUS)
    if f.any_tag_keys or f.tag_selectors:
        kinds.add(TAGS)
    if f.reads_twin:
        kinds.add(TWIN)
    if f.last_seen_after is not None or f.last_seen_before is not None:
        kinds.add(LAST_SEEN)
    if f.sync_statuses:
        kinds.add(SYNC_TIMEOUT)
    return frozenset(kinds)


def cause(changes: Iterable[str], sensitive: frozenset[str]) -> str:
    """The cause to report among `changes` (not empty) for a group sensitive
    to `sensitive`: the most telling change the group can see, else the most
    telling change there is."""
    ranked = sorted(set(changes), key=_RANK.__getitem__)
    if not ranked:
        raise ValueError("no change to name")
    return next((c for c in ranked if c in sensitive), ranked[0])
