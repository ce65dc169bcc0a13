"""Tenant-scoped reads of the connectivity log (the API's side; the evaluator's
writes are in `transitions`). Every function runs on a `Database.tenant`
connection and also names the tenant, so the indexes that lead with tenant_id
are used and RLS is a second, independent fence.

SQL text is assembled only from fixed fragments; every value is a parameter.
Optional conditions are left out rather than written as `$n IS NULL OR ...`,
which would leave a cached generic plan unable to use the right index.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server import event_log
from server.connectivity.model import EVENT_WRITER_LOCK, DeviceFacts, EventRecord, Position
from server.db import Connection

_WRITER_LOCK = event_log.WriterLock.of_bigint(EVENT_WRITER_LOCK)

_EVENT_COLUMNS = """
    e.event_id, e.tenant_id, e.device_id, e.event_type, e.occurred_at,
    e.previous_status, e.status, e.trigger, e.details, e.xact
"""
_DEVICE_COLUMNS = """,
    d.name AS d_name, d.site_id AS d_site_id, d.model AS d_model, d.tags AS d_tags,
    d.lifecycle AS d_lifecycle, s.last_seen_at AS d_last_seen_at
"""
# Static groups' members (migrations/0002), for watchers narrowed by a group;
# the placeholder is the list of group ids asked about.
_STATIC_GROUPS = """,
    ARRAY(SELECT m.group_id FROM device_group_members m
          WHERE m.tenant_id = e.tenant_id AND m.device_id = e.device_id
            AND m.group_id = ANY({}::text[])) AS d_groups
"""
_TWIN_COLUMNS = """,
    s.desired AS t_desired, s.reported AS t_reported, s.desired_version AS t_desired_version,
    s.reported_version AS t_reported_version, s.desired_updated_at AS t_desired_updated_at,
    s.reported_updated_at AS t_reported_updated_at
"""
_TWIN_FIELDS = (
    "desired",
    "reported",
    "desired_version",
    "reported_version",
    "desired_updated_at",
    "reported_updated_at",
)
_DEVICE_JOIN = """
    LEFT JOIN devices d ON d.tenant_id = e.tenant_id AND d.device_id = e.device_id
    LEFT JOIN device_state s ON s.tenant_id = e.tenant_id AND s.device_id = e.device_id
"""


def _record(
    row: asyncpg.Record, *, with_device: bool = False, with_twin: bool = False
) -> EventRecord:
    device = None
    if with_device and row["d_lifecycle"] is not None:
        twin = {name: row[f"t_{name}"] for name in _TWIN_FIELDS} if with_twin else None
        device = DeviceFacts(
            name=row["d_name"],
            site_id=row["d_site_id"],
            model=row["d_model"],
            tags=row["d_tags"],
            lifecycle=row["d_lifecycle"],
            last_seen_at=row["d_last_seen_at"],
            static_groups=frozenset(row["d_groups"] or ()),
            twin=twin,
        )
    return EventRecord(
        event_id=row["event_id"],
        tenant_id=row["tenant_id"],
        device_id=row["device_id"],
        event_type=row["event_type"],
        occurred_at=row["occurred_at"],
        previous_status=row["previous_status"],
        status=row["status"],
        trigger=row["trigger"],
        details=row["details"],
        xact=row["xact"],
        device=device,
    )


class _Params:
    """Numbers placeholders as values are added."""

    def __init__(self, *initial: object) -> None:
        self.values: list[object] = list(initial)

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


async def device_exists(con: Connection, tenant_id: uuid.UUID, device_id: str) -> bool:
    found = await con.fetchval(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE tenant_id = $1 AND device_id = $2)",
        tenant_id,
        device_id,
    )
    return bool(found)


@dataclass(frozen=True, slots=True)
class EventSelection:
    """Which events a listing is about; every condition set must hold."""

    device_id: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    event_types: Sequence[str] = ()

    def terms(self, p: _Params) -> list[str]:
        terms = ["e.tenant_id = $1"]
        if self.device_id is not None:
            terms.append(f"e.device_id = {p.add(self.device_id)}")
        if self.start_time is not None:
            terms.append(f"e.occurred_at >= {p.add(self.start_time)}")
        if self.end_time is not None:
            terms.append(f"e.occurred_at < {p.add(self.end_time)}")
        if self.event_types:
            terms.append(f"e.event_type = ANY({p.add(list(self.event_types))}::text[])")
        return terms


async def list_events(
    con: Connection,
    tenant_id: uuid.UUID,
    selection: EventSelection,
    *,
    before: tuple[datetime, int] | None,
    limit: int,
    skip: int = 0,
) -> list[EventRecord]:
    """Up to `limit` events, newest first by (occurred_at, event_id), strictly
    before the key `before` when given, after skipping `skip` of them."""
    p = _Params(tenant_id)
    terms = selection.terms(p)
    if before is not None:
        at, event_id = before
        terms.append(f"(e.occurred_at, e.event_id) < ({p.add(at)}, {p.add(event_id)})")
    rows = await con.fetch(
        f"""
        SELECT {_EVENT_COLUMNS} FROM connection_events e
        WHERE {" AND ".join(terms)}
        ORDER BY e.occurred_at DESC, e.event_id DESC
        LIMIT {p.add(limit)} OFFSET {p.add(skip)}
        """,
        *p.values,
    )
    return [_record(r) for r in rows]


async def count_events(con: Connection, tenant_id: uuid.UUID, selection: EventSelection) -> int:
    p = _Params(tenant_id)
    found = await con.fetchval(
        f"SELECT count(*) FROM connection_events e WHERE {' AND '.join(selection.terms(p))}",
        *p.values,
    )
    return int(found)


@dataclass(frozen=True, slots=True)
class Batch:
    """Events after a position, in delivery order, as far as they are final."""

    events: list[EventRecord]
    #: Nothing can be committed before Position(horizon, 0) any more.
    horizon: int
    #: Committed events exist at or beyond the horizon, held back only by an
    #: older writer still running: read again soon (its commit may bring no
    #: notification, if it inserted no events).
    pending: bool
    limit: int

    @property
    def end(self) -> Position:
        """How far this read has seen: its last event when it stopped at the
        limit, else the horizon (it returned everything final)."""
        if len(self.events) >= self.limit:
            return self.events[-1].position
        return Position(self.horizon, 0)


async def read_after(
    con: Connection,
    tenant_id: uuid.UUID,
    after: Position,
    *,
    limit: int,
    device_ids: Sequence[str] = (),
    event_types: Sequence[str] = (),
    with_devices: bool = False,
    static_groups: Sequence[str] = (),
    with_twins: bool = False,
) -> Batch:
    """The tenant's final events after `after`, in (xact, event_id) order.

    Two statements in the caller's (read committed) transaction: the writers
    first, then the horizon and the events, from one later snapshot.

    `with_devices` adds each device's current columns (for group filters) and
    its membership among `static_groups`; `with_twins` also its twin.
    """
    bound, writers = await event_log.writers(con, _WRITER_LOCK)
    p = _Params(bound, writers, tenant_id, after.xact, after.event_id, limit)
    terms = ["e.tenant_id = $3", "(e.xact, e.event_id) > ($4, $5)", "e.xact < h.horizon"]
    if device_ids:
        terms.append(f"e.device_id = ANY({p.add(list(device_ids))}::text[])")
    if event_types:
        terms.append(f"e.event_type = ANY({p.add(list(event_types))}::text[])")
    device_columns = ""
    if with_devices:
        device_columns = _DEVICE_COLUMNS + _STATIC_GROUPS.format(p.add(list(static_groups)))
        if with_twins:
            device_columns += _TWIN_COLUMNS
    rows = await con.fetch(
        f"""
        SELECT h.horizon,
               {event_log.pending_sql("connection_events")} AS pending,
               e.*
        FROM (SELECT {event_log.HORIZON_SQL} AS horizon) h
        LEFT JOIN LATERAL (
            SELECT {_EVENT_COLUMNS} {device_columns}
            FROM connection_events e {_DEVICE_JOIN if with_devices else ""}
            WHERE {" AND ".join(terms)}
            ORDER BY e.xact, e.event_id
            LIMIT $6
        ) e ON true
        ORDER BY e.xact, e.event_id
        """,
        *p.values,
    )
    first = rows[0]
    events = [
        _record(r, with_device=with_devices, with_twin=with_devices and with_twins)
        for r in rows
        if r["event_id"] is not None
    ]
    return Batch(events=events, horizon=first["horizon"], pending=first["pending"], limit=limit)


async def horizon(con: Connection) -> int:
    """The current horizon: no event can be committed before Position(horizon, 0)."""
    return await event_log.horizon(con, _WRITER_LOCK)
