"""Group memberships as rows, and the ENTERED / LEFT events that change them
(migrations/0008, docs/groups.md "Membership events").

The maintainer's side (`pending_tenants`, `maintain`) turns the queued
changes of one tenant into events in one transaction; the watch's side
(`read_after`, `horizon`) reads them back in delivery order.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from server import event_log, filters
from server.db import Connection
from server.event_log import Position
from server.groups import causes
from server.groups.store import DYNAMIC, compile_members_filter

CHANNEL: Final = "pulse_membership_events"
"""NOTIFY channel; the payload is the tenant id of the committed events."""

_TENANT_LOCK_CLASS: Final = 0x706D


def tenant_lock(tenant_id: uuid.UUID) -> event_log.WriterLock:
    """The lock a tenant's maintainer holds: one at a time per tenant, and the
    writer lock of the tenant's events (event_log's horizon). A tenant's
    writers being serialised, every event a snapshot sees is below the
    horizon computed at that snapshot, and every other event at or above it.
    Keyed by the id's first 32 bits; tenants sharing them only wait for each
    other."""
    return event_log.WriterLock(_TENANT_LOCK_CLASS, int.from_bytes(tenant_id.bytes[:4]), 2)


_FROM_DEVICES = """
    FROM devices d
    LEFT JOIN device_state s ON s.tenant_id = d.tenant_id AND s.device_id = d.device_id
"""


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    event_id: int
    group_id: str
    device_id: str
    event_type: str
    cause: str
    occurred_at: datetime
    xact: int

    @property
    def position(self) -> Position:
        return Position(self.xact, self.event_id)


@dataclass(frozen=True, slots=True)
class _Group:
    group_id: str
    filter: filters.DeviceFilter | None  # None: static

    @property
    def sensitive(self) -> frozenset[str]:
        return causes.sensitive_to(self.filter)


class _Params:
    def __init__(self, *initial: object) -> None:
        self.values: list[object] = list(initial)

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    @property
    def next(self) -> int:
        return len(self.values) + 1


# -- the maintainer


async def pending_tenants(con: Connection, *, limit: int = 10_000) -> list[uuid.UUID]:
    """Tenants with queued changes or due timers (a fleet-wide read, as pulse_evaluator)."""
    rows = await con.fetch(
        """
        SELECT tenant_id FROM (
            SELECT tenant_id FROM membership_changes ORDER BY change_id LIMIT $1) c
        UNION
        SELECT tenant_id FROM (
            SELECT tenant_id FROM membership_timers WHERE due_at <= now()
            ORDER BY due_at LIMIT $1) t
        """,
        limit,
    )
    return [r["tenant_id"] for r in rows]


async def maintain(
    con: Connection,
    tenant_id: uuid.UUID,
    *,
    stale_after: timedelta,
    limit: int = 5_000,
) -> int | None:
    """Apply up to `limit` of the tenant's queued changes: re-evaluate what
    they touched, store the new memberships and insert their events. Returns
    how many events it inserted, or None when another maintainer holds the
    tenant.

    Runs in a REPEATABLE READ tenant transaction that has written nothing yet
    (the tenant lock must come before its transaction id). Should another
    process's pass on the tenant commit between this snapshot and the lock,
    every row both would write is one this pass cannot update: it fails with
    a serialisation error and is retried, so no change is applied twice.
    """
    lock = tenant_lock(tenant_id)
    # (int, int) keys are signed; pg_locks shows them unsigned.
    signed = lock.objid - (1 << 32) if lock.objid >= 1 << 31 else lock.objid
    locked = await con.fetchval("SELECT pg_try_advisory_xact_lock($1, $2)", lock.classid, signed)
    if not locked:
        return None
    groups = await _groups(con, tenant_id)
    whole, changed = await _claim(con, tenant_id, groups, limit)
    events: list[tuple[str, str, str, str]] = []
    for group_id in sorted(whole):
        for row in await _diff_group(con, tenant_id, groups[group_id], stale_after):
            events.append((row["group_id"], row["device_id"], row["event_type"], causes.GROUP_EDIT))
    if changed:
        rows = await _diff_devices(con, tenant_id, sorted(changed), groups, stale_after)
        for row in rows:
            group = groups.get(row["group_id"])
            cause = _cause(changed[row["device_id"]], row["group_id"], group)
            events.append((row["group_id"], row["device_id"], row["event_type"], cause))
    if events:
        await con.execute(
            """
            INSERT INTO membership_events (tenant_id, group_id, device_id, event_type, cause)
            SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])
            """,
            tenant_id,
            *(list(column) for column in zip(*events, strict=True)),
        )
        await con.execute("SELECT pg_notify($1, $2)", CHANNEL, str(tenant_id))
    timed = any(g.filter is not None and g.filter.sync_statuses for g in groups.values())
    if timed and (whole or changed):
        # Whole groups were re-read: every pending device may need a timer.
        await _schedule(con, tenant_id, None if whole else sorted(changed), stale_after)
    return len(events)


async def _groups(con: Connection, tenant_id: uuid.UUID) -> dict[str, _Group]:
    rows = await con.fetch(
        "SELECT group_id, group_type, query_filter FROM device_groups WHERE tenant_id = $1",
        tenant_id,
    )
    return {
        r["group_id"]: _Group(
            r["group_id"],
            filters.parse_filter(r["query_filter"]) if r["group_type"] == DYNAMIC else None,
        )
        for r in rows
    }


# Per device, what changed: (the group it concerns, or None for every group; the kind).
_Changes = set[tuple[str | None, str]]


async def _claim(
    con: Connection, tenant_id: uuid.UUID, groups: dict[str, _Group], limit: int
) -> tuple[set[str], dict[str, _Changes]]:
    """Take queued changes and due timers: the groups to re-evaluate whole,
    and the devices to re-evaluate with their changes."""
    changes = await con.fetch(
        """
        DELETE FROM membership_changes WHERE change_id IN (
            SELECT change_id FROM membership_changes WHERE tenant_id = $1
            ORDER BY change_id LIMIT $2)
        RETURNING device_id, group_id, cause
        """,
        tenant_id,
        limit,
    )
    due = await con.fetch(
        """
        DELETE FROM membership_timers WHERE tenant_id = $1 AND due_at <= now()
        RETURNING device_id
        """,
        tenant_id,
    )
    whole: set[str] = set()
    changed: defaultdict[str, _Changes] = defaultdict(set)
    for change in changes:
        if change["device_id"] is None:
            if change["group_id"] in groups:  # not deleted since
                whole.add(change["group_id"])
        else:
            changed[change["device_id"]].add((change["group_id"], change["cause"]))
    for timer in due:
        changed[timer["device_id"]].add((None, causes.SYNC_TIMEOUT))
    return whole, changed


def _cause(changes: _Changes, group_id: str, group: _Group | None) -> str:
    # A change of another group's members does not move a device here
    # (should this group move it anyway, any change is named).
    mine = {kind for concerns, kind in changes if concerns in (None, group_id)}
    sensitive = group.sensitive if group is not None else frozenset()
    return causes.cause(mine or {kind for _, kind in changes}, sensitive)


def _want(p: _Params, group: _Group, device_scope: str | None, stale_after: timedelta) -> str:
    """A SELECT of (group_id, device_id) for the group's members, within the
    devices `device_scope` (a bound text[] placeholder) or all of them."""
    scope = f" AND d.device_id = ANY({device_scope}::text[])" if device_scope else ""
    group_id = p.add(group.group_id)
    if group.filter is None:
        return (
            f"SELECT {group_id}::text AS group_id, m.device_id FROM device_group_members m"
            f" JOIN devices d ON d.tenant_id = m.tenant_id AND d.device_id = m.device_id"
            f" WHERE m.tenant_id = $1 AND m.group_id = {group_id}::text{scope}"
        )
    compiled = compile_members_filter(group.filter, first_param=p.next, stale_after=stale_after)
    p.values.extend(compiled.params)
    return (
        f"SELECT {group_id}::text AS group_id, d.device_id {_FROM_DEVICES}"
        f" WHERE d.tenant_id = $1{scope} AND {compiled.sql}"
    )


def _diff_sql(want: str, have_scope: str) -> str:
    """Make group_memberships (within `have_scope`) equal `want`; returns the changes."""
    return f"""
        WITH want AS MATERIALIZED ({want}),
        have AS MATERIALIZED (
            SELECT m.group_id, m.device_id FROM group_memberships m
            WHERE m.tenant_id = $1 AND {have_scope}
        ),
        entered AS (
            INSERT INTO group_memberships (tenant_id, group_id, device_id)
            SELECT $1, x.group_id, x.device_id
            FROM (SELECT group_id, device_id FROM want
                  EXCEPT SELECT group_id, device_id FROM have) x
            RETURNING group_id, device_id
        ),
        gone AS (
            DELETE FROM group_memberships m
            USING (SELECT group_id, device_id FROM have
                   EXCEPT SELECT group_id, device_id FROM want) x
            WHERE m.tenant_id = $1 AND m.group_id = x.group_id AND m.device_id = x.device_id
            RETURNING m.group_id, m.device_id
        )
        SELECT group_id, device_id, 'ENTERED' AS event_type FROM entered
        UNION ALL
        SELECT group_id, device_id, 'LEFT' FROM gone
        ORDER BY device_id, group_id
    """


async def _diff_group(
    con: Connection, tenant_id: uuid.UUID, group: _Group, stale_after: timedelta
) -> list[asyncpg.Record]:
    p = _Params(tenant_id)
    want = _want(p, group, None, stale_after)
    sql = _diff_sql(want, f"m.group_id = {p.add(group.group_id)}::text")
    return list(await con.fetch(sql, *p.values))


async def _diff_devices(
    con: Connection,
    tenant_id: uuid.UUID,
    device_ids: list[str],
    groups: dict[str, _Group],
    stale_after: timedelta,
) -> list[asyncpg.Record]:
    p = _Params(tenant_id, device_ids)
    wants = [_want(p, g, "$2", stale_after) for g in groups.values()]
    want = " UNION ALL ".join(wants) if wants else _NO_MEMBERS
    sql = _diff_sql(want, "m.device_id = ANY($2::text[])")
    return list(await con.fetch(sql, *p.values))


_NO_MEMBERS = "SELECT NULL::text AS group_id, NULL::text AS device_id WHERE false"

_PENDING = filters.DeviceFilter(
    sync_statuses=(filters.TwinSyncStatus.PENDING,), include_decommissioned=True
)


async def _schedule(
    con: Connection, tenant_id: uuid.UUID, device_ids: list[str] | None, stale_after: timedelta
) -> None:
    """A timer for each (of those) device(s) whose twin is PENDING: when it
    turns STALE by time alone, it is re-evaluated then."""
    p = _Params(tenant_id, stale_after)
    scope = ""
    if device_ids is not None:
        scope = f" AND d.device_id = ANY({p.add(device_ids)}::text[])"
    compiled = filters.compile_filter(_PENDING, first_param=p.next, stale_after=stale_after)
    p.values.extend(compiled.params)
    # A millisecond past the threshold: the rule's comparison is strict.
    await con.execute(
        f"""
        INSERT INTO membership_timers (tenant_id, device_id, due_at)
        SELECT d.tenant_id, d.device_id,
               coalesce(s.desired_updated_at, s.reported_updated_at)
               + $2::interval + interval '1 millisecond'
        {_FROM_DEVICES}
        WHERE d.tenant_id = $1{scope} AND {compiled.sql}
          -- Without either time the rule never calls the twin late.
          AND coalesce(s.desired_updated_at, s.reported_updated_at) IS NOT NULL
        ON CONFLICT (tenant_id, device_id) DO UPDATE SET due_at = excluded.due_at
        """,
        *p.values,
    )


# -- the watch


_EVENT_COLUMNS = "e.event_id, e.group_id, e.device_id, e.event_type, e.cause, e.occurred_at, e.xact"


def _event(r: asyncpg.Record) -> MembershipEvent:
    return MembershipEvent(
        event_id=r["event_id"],
        group_id=r["group_id"],
        device_id=r["device_id"],
        event_type=r["event_type"],
        cause=r["cause"],
        occurred_at=r["occurred_at"],
        xact=r["xact"],
    )


@dataclass(frozen=True, slots=True)
class Batch:
    """Events after a position, in delivery order, as far as they are final."""

    events: list[MembershipEvent]
    horizon: int
    #: Committed events wait behind an older writer still running.
    pending: bool
    limit: int
    #: Of the groups asked about, those that no longer exist.
    missing_groups: frozenset[str] = frozenset()

    @property
    def end(self) -> Position:
        if len(self.events) >= self.limit:
            return self.events[-1].position
        return Position(self.horizon, 0)


async def read_after(
    con: Connection,
    tenant_id: uuid.UUID,
    after: Position,
    group_ids: Sequence[str],
    *,
    limit: int,
) -> Batch:
    """The events of `group_ids` after `after`, in (xact, event_id) order, and
    which of those groups are gone."""
    bound, writers = await event_log.writers(con, tenant_lock(tenant_id))
    rows = await con.fetch(
        f"""
        SELECT h.horizon,
               {event_log.pending_sql("membership_events")} AS pending,
               ARRAY(SELECT g FROM unnest($7::text[]) g
                     WHERE NOT EXISTS (SELECT 1 FROM device_groups dg
                                       WHERE dg.tenant_id = $3 AND dg.group_id = g)) AS missing,
               e.*
        FROM (SELECT {event_log.HORIZON_SQL} AS horizon) h
        LEFT JOIN LATERAL (
            SELECT {_EVENT_COLUMNS} FROM membership_events e
            WHERE e.tenant_id = $3 AND e.group_id = ANY($7::text[])
              AND (e.xact, e.event_id) > ($4, $5) AND e.xact < h.horizon
            ORDER BY e.xact, e.event_id
            LIMIT $6
        ) e ON true
        ORDER BY e.xact, e.event_id
        """,
        bound,
        writers,
        tenant_id,
        after.xact,
        after.event_id,
        limit,
        list(group_ids),
    )
    first = rows[0]
    return Batch(
        events=[_event(r) for r in rows if r["event_id"] is not None],
        horizon=first["horizon"],
        pending=first["pending"],
        limit=limit,
        missing_groups=frozenset(first["missing"]),
    )


async def members_after(
    con: Connection, tenant_id: uuid.UUID, group_id: str, after: str, *, limit: int
) -> list[str]:
    """Up to `limit` member ids after `after`, as last evaluated, in id order."""
    rows = await con.fetch(
        """
        SELECT device_id FROM group_memberships
        WHERE tenant_id = $1 AND group_id = $2 AND device_id > $3
        ORDER BY device_id LIMIT $4
        """,
        tenant_id,
        group_id,
        after,
        limit,
    )
    return [r["device_id"] for r in rows]


async def horizon(con: Connection, tenant_id: uuid.UUID) -> int:
    return await event_log.horizon(con, tenant_lock(tenant_id))
