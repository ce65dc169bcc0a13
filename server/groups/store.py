"""All SQL for device groups. Every function runs on a tenant-scoped
connection (`Database.tenant`) and also names the tenant explicitly, so the
primary-key indexes are used and RLS is a second, independent fence.

A dynamic group's members are read from the membership the maintainer
keeps (`group_memberships`), with the devices whose changes it has not applied
yet evaluated against the filter in the same statement: as current as
evaluating the whole filter, at the cost of a page (docs/groups.md, "Reading
members"). Ad hoc filters (`PreviewFilter`) are evaluated whole.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import filters
from server.db import Connection
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)

STATIC = "STATIC"
DYNAMIC = "DYNAMIC"

# update_mask path -> column. Nothing else ever reaches the SET clause.
UPDATABLE = {"name": "name", "description": "description", "query_filter": "query_filter"}


@dataclass(frozen=True, slots=True)
class GroupRecord:
    group_id: str
    name: str
    description: str
    group_type: str
    # Canonical filter JSON for dynamic groups, None for static ones.
    query_filter: dict[str, object] | None
    version: int
    created_at: datetime
    updated_at: datetime
    member_count: int = 0


@dataclass(frozen=True, slots=True)
class MemberRecord:
    device_id: str
    name: str
    # None only if a device lacked its device_state row (see _FROM_DEVICES).
    status: str | None
    site_id: str | None


_GROUP_COLUMNS = """
    group_id, name, description, group_type, query_filter, version, created_at, updated_at
"""

# The left join costs nothing when the filter reads device_state (a strict
# condition on `s` turns it into an inner join) and lets the planner drop the
# join entirely from a count whose filter never reads `s`. Every device has a
# state row (both are inserted together), so the results are the same as an
# inner join's; the compiled filter is two-valued under an outer join.
_FROM_DEVICES = """
    FROM devices d
    LEFT JOIN device_state s ON s.tenant_id = d.tenant_id AND s.device_id = d.device_id
"""

_MEMBER_COLUMNS = "d.device_id, d.name, s.status, d.site_id"


def _group(row: asyncpg.Record, member_count: int = 0) -> GroupRecord:
    return GroupRecord(**dict(row.items()), member_count=member_count)


def _member(row: asyncpg.Record) -> MemberRecord:
    return MemberRecord(**dict(row.items()))


# --------------------------------------------------------------------------
# Groups


async def create_group(
    con: Connection,
    tenant_id: uuid.UUID,
    *,
    group_id: str,
    name: str,
    description: str,
    group_type: str,
    query_filter: dict[str, object] | None,
) -> GroupRecord:
    try:
        row = await con.fetchrow(
            f"""
            INSERT INTO device_groups
                (tenant_id, group_id, name, description, group_type, query_filter)
            VALUES ($1, $2, $3, $4, $5, $6)
            RETURNING {_GROUP_COLUMNS}
            """,
            tenant_id,
            group_id,
            name,
            description,
            group_type,
            query_filter,
        )
    except asyncpg.UniqueViolationError as e:
        raise AlreadyExists("group", group_id) from e
    assert row is not None
    return _group(row)


async def get_group(
    con: Connection, tenant_id: uuid.UUID, group_id: str, *, lock: bool = False
) -> GroupRecord:
    # With `lock`, a concurrent DeleteGroup waits until this transaction (a
    # member change) ends, rather than deleting the group between our check
    # and our insert; concurrent member changes do not wait for each other.
    suffix = " FOR SHARE" if lock else ""
    row = await con.fetchrow(
        f"""
        SELECT {_GROUP_COLUMNS} FROM device_groups
        WHERE tenant_id = $1 AND group_id = $2{suffix}
        """,
        tenant_id,
        group_id,
    )
    if row is None:
        raise NotFound("group", group_id)
    return _group(row)


async def list_groups(
    con: Connection, tenant_id: uuid.UUID, *, after: tuple[str, str] | None, limit: int
) -> list[GroupRecord]:
    """Up to `limit` groups after the (name, group_id) key `after`."""
    name, group_id = after if after is not None else ("", "")
    rows = await con.fetch(
        f"""
        SELECT {_GROUP_COLUMNS} FROM device_groups
        WHERE tenant_id = $1 AND (name, group_id) > ($2, $3)
        ORDER BY name, group_id
        LIMIT $4
        """,
        tenant_id,
        name,
        group_id,
        limit,
    )
    return [_group(r) for r in rows]


async def update_group(
    con: Connection,
    tenant_id: uuid.UUID,
    group_id: str,
    *,
    expected_version: int | None,
    changes: dict[str, Any],
) -> GroupRecord:
    """One UPDATE; given `expected_version`, it applies only at that version."""
    columns = [UPDATABLE[path] for path in changes]
    assignments = ", ".join(f"{col} = ${i}" for i, col in enumerate(columns, start=4))
    row = await con.fetchrow(
        f"""
        UPDATE device_groups
        SET {assignments}, version = version + 1, updated_at = now()
        WHERE tenant_id = $1 AND group_id = $2 AND ($3::bigint IS NULL OR version = $3)
        RETURNING {_GROUP_COLUMNS}
        """,
        tenant_id,
        group_id,
        expected_version,
        *changes.values(),
    )
    if row is None:
        current = await get_group(con, tenant_id, group_id)  # NotFound if absent
        assert expected_version is not None
        raise version_mismatch(current, expected_version)
    return _group(row)


async def count_groups(con: Connection, tenant_id: uuid.UUID) -> int:
    found = await con.fetchval("SELECT count(*) FROM device_groups WHERE tenant_id = $1", tenant_id)
    return int(found)


def version_mismatch(current: GroupRecord, expected: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"group {current.group_id!r} is at version {current.version}, not {expected}; "
        "read it again and retry",
        reason=ErrorReason.VERSION_MISMATCH,
        metadata={
            "group": current.group_id,
            "current_version": str(current.version),
            "expected_version": str(expected),
        },
        subject=f"device-groups/{current.group_id}",
    )


async def delete_group(
    con: Connection, tenant_id: uuid.UUID, group_id: str, *, expected_version: int | None
) -> None:
    deleted = await con.fetchval(
        """
        DELETE FROM device_groups
        WHERE tenant_id = $1 AND group_id = $2 AND ($3::bigint IS NULL OR version = $3)
        RETURNING version
        """,
        tenant_id,
        group_id,
        expected_version,
    )
    if deleted is None:
        current = await get_group(con, tenant_id, group_id)  # NotFound if absent
        assert expected_version is not None
        raise version_mismatch(current, expected_version)


# --------------------------------------------------------------------------
# Static members


async def add_members(
    con: Connection, tenant_id: uuid.UUID, group_id: str, device_ids: list[str]
) -> int:
    """Add devices to a static group; returns how many were new.

    Unknown devices are INVALID_ARGUMENT naming each one (by its index in
    `device_ids`), checked before anything is inserted.
    """
    missing = await con.fetch(
        """
        SELECT i.ord - 1 AS index, i.device_id
        FROM unnest($2::text[]) WITH ORDINALITY AS i (device_id, ord)
        WHERE NOT EXISTS (
            SELECT 1 FROM devices d WHERE d.tenant_id = $1 AND d.device_id = i.device_id
        )
        ORDER BY i.ord
        """,
        tenant_id,
        device_ids,
    )
    if missing:
        raise InvalidArgument(
            [
                FieldViolation(f"device_ids[{r['index']}]", f"device {r['device_id']!r} not found")
                for r in missing
            ]
        )
    try:
        result = await con.execute(
            """
            INSERT INTO device_group_members (tenant_id, group_id, device_id)
            SELECT $1, $2, unnest($3::text[])
            ON CONFLICT DO NOTHING
            """,
            tenant_id,
            group_id,
            device_ids,
        )
    except asyncpg.ForeignKeyViolationError as e:
        # The group is locked by the caller, so only the devices can be at
        # fault here: one was checked above, then vanished. Devices are
        # never deleted today; this keeps the answer right if that changes.
        raise InvalidArgument.single("device_ids", "a device was removed concurrently") from e
    return int(result.rsplit(" ", 1)[-1])


async def remove_members(
    con: Connection, tenant_id: uuid.UUID, group_id: str, device_ids: list[str]
) -> int:
    result = await con.execute(
        """
        DELETE FROM device_group_members
        WHERE tenant_id = $1 AND group_id = $2 AND device_id = ANY($3::text[])
        """,
        tenant_id,
        group_id,
        device_ids,
    )
    return int(result.rsplit(" ", 1)[-1])


# --------------------------------------------------------------------------
# Membership, resolved at read time

# Under row-level security the planner ignores column statistics for
# operators that are not LEAKPROOF, which includes jsonb's ?, ?| and @>: every
# tag condition is estimated to keep 1% of the rows. A count whose filter has
# tag conditions and also reads device_state can then be planned as a nested
# loop over what is really most of the fleet (seconds instead of a hash
# join's fraction of one). Such counts first count up to this many members
# with the planner's plan, which is exact and fast for small groups, and only
# a group that reaches it is counted again with nested loops ruled out.
COUNT_PROBE = 10_000
_BULK_COUNT = "SET LOCAL enable_nestloop = off; SET LOCAL work_mem = '32MB'"
# Back to the defaults, for whatever else the transaction runs (ListGroups
# counts every group of a page in one transaction).
_END_BULK_COUNT = "SET LOCAL enable_nestloop = DEFAULT; SET LOCAL work_mem = DEFAULT"


def compile_members_filter(
    f: filters.DeviceFilter,
    *,
    first_param: int,
    stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER,
) -> filters.CompiledFilter:
    """``compile_filter``, with a one-value site or status as a plain equality.

    ``col = ANY('{v}')`` selects what ``col = 'v'`` does, but PostgreSQL
    before 17 does not treat it as an equality when it orders an index scan,
    so a page of "online devices at site 7" would read and sort every device
    at the site instead of walking (site_id, device_id) in order and stopping
    after one page.
    """
    eq: list[tuple[str, object]] = []
    rest = f
    if len(f.site_ids) == 1:
        eq.append(("d.site_id", f.site_ids[0]))
        rest = replace(rest, site_ids=())
    if len(f.statuses) == 1:
        eq.append(("s.status", f.statuses[0].value))
        rest = replace(rest, statuses=())
    compiled = filters.compile_filter(
        rest, first_param=first_param + len(eq), stale_after=stale_after
    )
    if not eq:
        return compiled
    terms = [f"{column} = ${first_param + i}::text" for i, (column, _) in enumerate(eq)]
    return filters.CompiledFilter(
        "(" + " AND ".join([*terms, compiled.sql]) + ")",
        [value for _, value in eq] + compiled.params,
    )


def stored_filter(group: GroupRecord) -> filters.DeviceFilter:
    """The saved filter of a dynamic group."""
    assert group.query_filter is not None, "static groups have no filter"
    # Stored JSON is canonical_json output, hence valid parse_filter input.
    return filters.parse_filter(group.query_filter)


def members_sql(compiled: filters.CompiledFilter) -> str:
    """One keyset page of a filter: $1 tenant, $2 last device_id, $3 limit.

    The compiled filter's placeholders must start at $4. Public so that the
    benchmark runs exactly this SQL without the server.
    """
    # The cursor on s too (in the join condition, so a device without its
    # state row is still found): the planner does not carry an inequality
    # across the join, and a twin condition drives the join from device_state
    # in device_id order, which without it walked from the tenant's first row.
    return f"""
        SELECT {_MEMBER_COLUMNS}
        FROM devices d
        LEFT JOIN device_state s ON s.tenant_id = d.tenant_id AND s.device_id = d.device_id
                                AND s.device_id > $2
        WHERE d.tenant_id = $1 AND d.device_id > $2 AND {compiled.sql}
        ORDER BY d.device_id
        LIMIT $3
    """


def count_sql(compiled: filters.CompiledFilter, *, limit: int | None = None) -> str:
    """How many devices match: $1 tenant; the filter's placeholders from $2.

    With `limit`, counting stops there.
    """
    matches = f"SELECT 1 {_FROM_DEVICES} WHERE d.tenant_id = $1 AND {compiled.sql}"
    if limit is not None:
        matches += f" LIMIT {int(limit)}"
    return f"SELECT count(*) FROM ({matches}) m"


_STALE_AFTER = filters.DEFAULT_TWIN_STALE_AFTER


# The maintained membership of group $G is current except for the devices
# with changes queued for every group or for this one, and those whose sync
# status may have turned stale since they were evaluated (a due timer; timers
# are set a millisecond past the rule's threshold). For those the filter is
# evaluated now. While the whole group waits to be (re-)evaluated (created,
# or its filter changed), `queued` is true and the rows cannot be used.
#
# The planner cannot know how long the queue is, so no plan may depend on
# it: pending devices are excluded from the rows by index probes (an anti-join
# over a long queue would cost rows x queue), and looked up by
# `= ANY(ARRAY(...))`, an index condition (a semi-join could walk the fleet
# from the cursor to find them).
_QUEUED_FOR = "(tenant_id = $1 AND device_id = {d} AND (group_id IS NULL OR group_id = $G))"
_DUE_FOR = "(tenant_id = $1 AND device_id = {d} AND due_at <= now() + interval '1 millisecond')"
_PENDING = f"""
    pending AS MATERIALIZED (
        SELECT device_id FROM membership_changes WHERE {_QUEUED_FOR.format(d="device_id")}
        UNION
        SELECT device_id FROM membership_timers WHERE {_DUE_FOR.format(d="device_id")}
    ),
    whole AS (
        SELECT EXISTS (SELECT 1 FROM membership_changes
                       WHERE tenant_id = $1 AND group_id = $G AND device_id IS NULL) AS queued
    )
"""
_NOT_PENDING = f"""
    NOT EXISTS (SELECT 1 FROM membership_changes WHERE {_QUEUED_FOR.format(d="gm.device_id")})
    AND NOT EXISTS (SELECT 1 FROM membership_timers WHERE {_DUE_FOR.format(d="gm.device_id")})
"""


def maintained_members_sql(compiled: filters.CompiledFilter) -> str:
    """One keyset page of a dynamic group from its maintained membership:
    $1 tenant, $2 last device_id, $3 limit, $4 group; the filter from $5.
    One row with `queued` true and no member when the rows cannot be used."""
    pending, not_pending = (sql.replace("$G", "$4") for sql in (_PENDING, _NOT_PENDING))
    return f"""
        WITH {pending}
        SELECT w.queued, m.* FROM whole w
        LEFT JOIN LATERAL (
            (SELECT {_MEMBER_COLUMNS}
             FROM group_memberships gm
             JOIN devices d ON d.tenant_id = gm.tenant_id AND d.device_id = gm.device_id
             LEFT JOIN device_state s ON s.tenant_id = d.tenant_id AND s.device_id = d.device_id
             -- The cursor on d too: the planner does not carry an inequality
             -- across the join, and a merge join walked devices from the start.
             WHERE gm.tenant_id = $1 AND gm.group_id = $4 AND gm.device_id > $2
               AND d.device_id > $2 AND {not_pending}
             ORDER BY gm.device_id
             LIMIT $3)
            UNION ALL
            (SELECT {_MEMBER_COLUMNS}
             {_FROM_DEVICES}
             WHERE d.tenant_id = $1 AND d.device_id > $2
               AND d.device_id = ANY(ARRAY(SELECT device_id FROM pending)) AND {compiled.sql})
            ORDER BY device_id
            LIMIT $3
        ) m ON NOT w.queued
        ORDER BY m.device_id
    """


def maintained_count_sql(compiled: filters.CompiledFilter) -> str:
    """How many members a dynamic group has, from its maintained membership:
    $1 tenant, $2 group; the filter from $3. NULL when the rows cannot be used.

    The rows, less the pending devices among them, plus the pending devices
    the filter selects now."""
    pending = _PENDING.replace("$G", "$2")
    return f"""
        WITH {pending}
        SELECT CASE WHEN (SELECT queued FROM whole) THEN NULL ELSE
            (SELECT count(*) FROM group_memberships gm
             WHERE gm.tenant_id = $1 AND gm.group_id = $2)
          - (SELECT count(*) FROM group_memberships gm
             WHERE gm.tenant_id = $1 AND gm.group_id = $2
               AND gm.device_id = ANY(ARRAY(SELECT device_id FROM pending)))
          + (SELECT count(*) {_FROM_DEVICES}
             WHERE d.tenant_id = $1 AND d.device_id = ANY(ARRAY(SELECT device_id FROM pending))
               AND {compiled.sql})
        END
    """


async def list_members(
    con: Connection,
    tenant_id: uuid.UUID,
    group: GroupRecord,
    *,
    after: str,
    limit: int,
    stale_after: timedelta = _STALE_AFTER,
) -> list[MemberRecord]:
    """Up to `limit` members with device_id > `after`, in device_id order.

    `stale_after` is the twin sync rule's threshold (PULSE_TWIN_STALE_AFTER_S),
    for filters on sync status; the maintainer must use the same.
    """
    if group.group_type == DYNAMIC:
        f = stored_filter(group)
        compiled = filters.compile_filter(f, first_param=5, stale_after=stale_after)
        await con.execute(filters.CUSTOM_PLANS)
        rows = await con.fetch(
            maintained_members_sql(compiled),
            tenant_id,
            after,
            limit,
            group.group_id,
            *compiled.params,
        )
        if not rows[0]["queued"]:
            return [
                MemberRecord(r["device_id"], r["name"], r["status"], r["site_id"])
                for r in rows
                if r["device_id"] is not None
            ]
        return await list_filter_members(
            con, tenant_id, f, after=after, limit=limit, stale_after=stale_after
        )
    rows = await con.fetch(
        f"""
        SELECT {_MEMBER_COLUMNS}
        FROM device_group_members m
        JOIN devices d ON d.tenant_id = m.tenant_id AND d.device_id = m.device_id
        LEFT JOIN device_state s ON s.tenant_id = d.tenant_id AND s.device_id = d.device_id
        WHERE m.tenant_id = $1 AND m.group_id = $2 AND m.device_id > $3
        ORDER BY m.device_id
        LIMIT $4
        """,
        tenant_id,
        group.group_id,
        after,
        limit,
    )
    return [_member(r) for r in rows]


async def list_filter_members(
    con: Connection,
    tenant_id: uuid.UUID,
    f: filters.DeviceFilter,
    *,
    after: str,
    limit: int,
    stale_after: timedelta = _STALE_AFTER,
) -> list[MemberRecord]:
    """Up to `limit` of the devices `f` selects, after `after` in device_id order."""
    compiled = compile_members_filter(f, first_param=4, stale_after=stale_after)
    await con.execute(filters.CUSTOM_PLANS)
    rows = await con.fetch(members_sql(compiled), tenant_id, after, limit, *compiled.params)
    return [_member(r) for r in rows]


async def count_members(
    con: Connection,
    tenant_id: uuid.UUID,
    group: GroupRecord,
    *,
    stale_after: timedelta = _STALE_AFTER,
) -> int:
    if group.group_type == DYNAMIC:
        f = stored_filter(group)
        compiled = filters.compile_filter(f, first_param=3, stale_after=stale_after)
        await con.execute(filters.CUSTOM_PLANS)
        maintained = await con.fetchval(
            maintained_count_sql(compiled), tenant_id, group.group_id, *compiled.params
        )
        if maintained is not None:
            return int(maintained)
        return await count_filter_members(con, tenant_id, f, stale_after=stale_after)
    count = await con.fetchval(
        "SELECT count(*) FROM device_group_members WHERE tenant_id = $1 AND group_id = $2",
        tenant_id,
        group.group_id,
    )
    return int(count)


def _estimates_are_blind(f: filters.DeviceFilter) -> bool:
    """Whether a count of `f` joins devices and device_state on a blind estimate."""
    has_tags = bool(f.any_tag_keys or f.tag_selectors)
    reads_state = bool(f.statuses or f.last_seen_before or f.last_seen_after or f.reads_twin)
    # Twin conditions are jsonb operators on device_state: blind themselves,
    # and a device_state row always joins its devices row (lifecycle).
    return (has_tags and reads_state) or bool(f.twin_conditions)


async def count_filter_members(
    con: Connection,
    tenant_id: uuid.UUID,
    f: filters.DeviceFilter,
    *,
    stale_after: timedelta = _STALE_AFTER,
) -> int:
    """How many devices `f` selects."""
    compiled = compile_members_filter(f, first_param=2, stale_after=stale_after)
    await con.execute(filters.CUSTOM_PLANS)
    if _estimates_are_blind(f):
        probe = await con.fetchval(
            count_sql(compiled, limit=COUNT_PROBE), tenant_id, *compiled.params
        )
        if probe < COUNT_PROBE:
            return int(probe)
        await con.execute(_BULK_COUNT)
        count = await con.fetchval(count_sql(compiled), tenant_id, *compiled.params)
        await con.execute(_END_BULK_COUNT)
        return int(count)
    count = await con.fetchval(count_sql(compiled), tenant_id, *compiled.params)
    return int(count)


async def with_member_count(
    con: Connection,
    tenant_id: uuid.UUID,
    group: GroupRecord,
    *,
    stale_after: timedelta = _STALE_AFTER,
) -> GroupRecord:
    count = await count_members(con, tenant_id, group, stale_after=stale_after)
    return replace(group, member_count=count)


# --------------------------------------------------------------------------
# The groups of one device

# The columns filters.DeviceRow holds, and the transaction's now(): the time
# the compiled SQL's sync-status term measures from.
_DEVICE_ROW_COLUMNS = """
    d.device_id, d.name, d.site_id, d.model, d.tags, d.lifecycle,
    s.status, s.last_seen_at, s.desired, s.reported, s.desired_version,
    s.reported_version, s.desired_updated_at, s.reported_updated_at
"""


async def device_groups(
    con: Connection,
    tenant_id: uuid.UUID,
    device_id: str,
    *,
    stale_after: timedelta = _STALE_AFTER,
) -> list[GroupRecord]:
    """The groups `device_id` is in right now, in ListGroups' (name, group_id) order.

    Static groups whose member rows list the device, whatever its lifecycle,
    and dynamic groups whose filter selects it. NotFound for an unknown device
    (another tenant's devices do not exist here). member_count is left 0.

    Dynamic groups are evaluated here in Python with `filters.matches`, not
    with one compiled query per group: `matches` is the reference the SQL
    compiler is property-tested against (tests/groups/test_membership.py), so
    it selects exactly what ListGroupMembers selects, and it costs one read of
    the device and one of the tenant's groups, however many groups there are.
    It is evaluated at the transaction's now(), the moment the SQL's
    `now()` would use, with the same `stale_after`.
    """
    found = await con.fetchrow(
        f"""
        SELECT {_DEVICE_ROW_COLUMNS}, now() AS now
        FROM devices d
        JOIN device_state s ON s.tenant_id = d.tenant_id AND s.device_id = d.device_id
        WHERE d.tenant_id = $1 AND d.device_id = $2
        """,
        tenant_id,
        device_id,
    )
    if found is None:
        raise NotFound("device", device_id)
    values = dict(found.items())
    now: datetime = values.pop("now")
    device = filters.DeviceRow(**values)
    # Every dynamic group, and the static groups listing the device (through
    # device_group_members (tenant_id, device_id)), already in ListGroups'
    # order: sorted by the database, in the "C" collation of name.
    rows = await con.fetch(
        f"""
        SELECT {_GROUP_COLUMNS} FROM device_groups g
        WHERE g.tenant_id = $1
          AND (g.group_type = '{DYNAMIC}' OR g.group_id IN (
                SELECT m.group_id FROM device_group_members m
                WHERE m.tenant_id = $1 AND m.device_id = $2))
        ORDER BY g.name, g.group_id
        """,
        tenant_id,
        device_id,
    )
    groups = [_group(r) for r in rows]
    return [
        g
        for g in groups
        if g.group_type == STATIC
        or filters.matches(stored_filter(g), device, now=now, stale_after=stale_after)
    ]


# A path picker needs the shape of the fleet's documents, not every device:
# the first devices with a non-empty document are read, a bounded cost at
# any fleet size.
TWIN_PATH_SAMPLE = 500
_TWIN_COLUMNS = {filters.TwinDocument.DESIRED: "desired", filters.TwinDocument.REPORTED: "reported"}


async def sample_twin_documents(
    con: Connection, tenant_id: uuid.UUID, document: filters.TwinDocument
) -> list[dict[str, Any]]:
    """Up to TWIN_PATH_SAMPLE non-empty `document`s of the tenant's devices."""
    column = _TWIN_COLUMNS[document]
    rows = await con.fetch(
        f"""
        SELECT s.{column} AS doc FROM device_state s
        WHERE s.tenant_id = $1 AND s.{column} <> '{{}}'::jsonb
        LIMIT {TWIN_PATH_SAMPLE}
        """,
        tenant_id,
    )
    return [r["doc"] for r in rows]
