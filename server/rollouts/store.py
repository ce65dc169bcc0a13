"""All SQL for rollouts (migrations/0011): the API's reads and state changes,
the target's devices, and the engine's lease and bookkeeping.

Tenant functions run on a tenant-scoped connection (`Database.tenant`);
`due` runs as the evaluator role, across tenants.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import filters
from server.db import Connection, Database
from server.errors import AlreadyExists, FailedPrecondition, NotFound
from server.groups import store as groups
from server.rollouts import rules
from server.twin import store as twin_store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NewRollout:
    rollout_id: str
    description: str
    target_group_id: str | None
    target_filter: dict[str, Any] | None
    patch: dict[str, Any]
    max_per_minute: int
    canary_count: int
    device_timeout: timedelta
    abort_threshold_percent: float | None
    abort_min_count: int
    failure_path: str
    continuous: bool
    created_by: str


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    rollout_id: str
    description: str
    target_group_id: str | None
    target_filter: dict[str, Any] | None
    patch: dict[str, Any]
    max_per_minute: int
    canary_count: int
    device_timeout: timedelta
    abort_threshold_percent: float | None
    abort_min_count: int
    failure_path: str
    continuous: bool
    state: str
    state_reason: str
    created_by: str
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    rate_since: datetime
    started_since: int
    next_enrol_at: datetime
    judged_at: datetime
    judged_through: str
    counts: rules.Counts = field(default_factory=rules.Counts)


_COUNT_COLUMNS = ("pending", "applied", "succeeded", "failed", "timed_out", "skipped", "superseded")
_COLUMNS = """
    rollout_id, description, target_group_id, target_filter, patch, max_per_minute,
    canary_count, device_timeout, abort_threshold_percent, abort_min_count, failure_path,
    continuous, state, state_reason, created_by, created_at, updated_at, ended_at,
    rate_since, started_since, next_enrol_at, judged_at, judged_through,
    pending, applied, succeeded, failed, timed_out, skipped, superseded
"""


def _record(row: asyncpg.Record) -> RolloutRecord:
    values = dict(row.items())
    counts = rules.Counts(**{name: values.pop(name) for name in _COUNT_COLUMNS})
    values.pop("now", None)
    return RolloutRecord(**values, counts=counts)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    state: str
    canary: bool
    desired_version: int
    detail: str
    applied_at: datetime | None
    ended_at: datetime | None
    change_seq: int | None


_DEVICE_COLUMNS = (
    "device_id, state, canary, desired_version, detail, applied_at, ended_at, change_seq"
)


def channel(tenant_id: uuid.UUID) -> str:
    """The NOTIFY channel announcing that rollouts of a tenant changed;
    the payload is the rollout id."""
    return f"rollouts_{tenant_id.hex}"


async def announce(db: Database, tenant_id: uuid.UUID, rollout_id: str) -> None:
    """Tell watchers that the rollout changed, after the change committed
    (outside the writing transaction, as twin changes are announced:
    server/twin/notify.py says why). Watchers re-read on their own too, so
    a notification that cannot be sent is only logged."""
    try:
        async with db.admin() as con:
            await twin_store.notify(con, [(channel(tenant_id), rollout_id)])
    except Exception:
        log.warning("could not announce a change of rollout %s", rollout_id, exc_info=True)


# --------------------------------------------------------------------------
# The target


@dataclass(frozen=True, slots=True)
class Target:
    """The devices a rollout targets right now: a static group's members, or
    the active devices a filter (a dynamic group's, or the rollout's own)
    selects."""

    static_group_id: str | None = None
    device_filter: filters.DeviceFilter | None = None


async def target(con: Connection, tenant_id: uuid.UUID, rollout: RolloutRecord) -> Target:
    """Raises NotFound when the target group no longer exists."""
    if rollout.target_filter is not None:
        return Target(device_filter=filters.parse_filter(rollout.target_filter))
    assert rollout.target_group_id is not None
    group = await groups.get_group(con, tenant_id, rollout.target_group_id)
    if group.group_type == groups.STATIC:
        return Target(static_group_id=group.group_id)
    return Target(device_filter=groups.stored_filter(group))


def _members_sql(t: Target, *, first_param: int, stale_after: timedelta) -> tuple[str, list[Any]]:
    """SELECT d.device_id of the target's active devices; $1 is the tenant."""
    if t.static_group_id is not None:
        return (
            f"""
            SELECT d.device_id
            FROM device_group_members m
            JOIN devices d ON d.tenant_id = m.tenant_id AND d.device_id = m.device_id
            WHERE m.tenant_id = $1 AND m.group_id = ${first_param} AND d.lifecycle = 'ACTIVE'
            """,
            [t.static_group_id],
        )
    assert t.device_filter is not None
    compiled = filters.compile_filter(
        t.device_filter, first_param=first_param, stale_after=stale_after
    )
    return (
        f"""
        SELECT d.device_id
        FROM devices d
        LEFT JOIN device_state s ON s.tenant_id = d.tenant_id AND s.device_id = d.device_id
        WHERE d.tenant_id = $1 AND d.lifecycle = 'ACTIVE' AND {compiled.sql}
        """,
        compiled.params,
    )


async def enrol(
    con: Connection,
    tenant_id: uuid.UUID,
    rollout_id: str,
    t: Target,
    *,
    stale_after: timedelta,
) -> int:
    """Add the target's devices not in the rollout yet, PENDING; how many."""
    members, params = _members_sql(t, first_param=3, stale_after=stale_after)
    await con.execute(filters.CUSTOM_PLANS)
    status = await con.execute(
        f"""
        INSERT INTO rollout_devices (tenant_id, rollout_id, device_id)
        SELECT $1, $2, m.device_id FROM ({members}) m
        ON CONFLICT DO NOTHING
        """,
        tenant_id,
        rollout_id,
        *params,
    )
    return int(status.rsplit(" ", 1)[1])


async def in_target(
    con: Connection,
    tenant_id: uuid.UUID,
    t: Target,
    device_ids: Sequence[str],
    *,
    stale_after: timedelta,
) -> set[str]:
    """Those of `device_ids` in the target now."""
    members, params = _members_sql(t, first_param=3, stale_after=stale_after)
    await con.execute(filters.CUSTOM_PLANS)
    rows = await con.fetch(
        f"SELECT device_id FROM ({members}) m WHERE m.device_id = ANY($2::text[])",
        tenant_id,
        list(device_ids),
        *params,
    )
    return {r["device_id"] for r in rows}


# --------------------------------------------------------------------------
# The API


async def create(
    con: Connection, tenant_id: uuid.UUID, new: NewRollout, *, stale_after: timedelta
) -> RolloutRecord:
    """Insert the rollout, RUNNING, with its target's devices now PENDING.

    Raises AlreadyExists, or NotFound for an unknown target group.
    """
    try:
        await con.execute(
            """
            INSERT INTO rollouts (
                tenant_id, rollout_id, description, target_group_id, target_filter, patch,
                max_per_minute, canary_count, device_timeout, abort_threshold_percent,
                abort_min_count, failure_path, continuous, created_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            """,
            tenant_id,
            new.rollout_id,
            new.description,
            new.target_group_id,
            new.target_filter,
            new.patch,
            new.max_per_minute,
            new.canary_count,
            new.device_timeout,
            new.abort_threshold_percent,
            new.abort_min_count,
            new.failure_path,
            new.continuous,
            new.created_by,
        )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists("rollout", new.rollout_id) from None
    record = await get(con, tenant_id, new.rollout_id)
    await enrol(
        con,
        tenant_id,
        new.rollout_id,
        await target(con, tenant_id, record),
        stale_after=stale_after,
    )
    return await get(con, tenant_id, new.rollout_id)


async def get(
    con: Connection, tenant_id: uuid.UUID, rollout_id: str, *, lock: bool = False
) -> RolloutRecord:
    row = await con.fetchrow(
        f"SELECT {_COLUMNS} FROM rollouts WHERE tenant_id = $1 AND rollout_id = $2"
        + (" FOR UPDATE" if lock else ""),
        tenant_id,
        rollout_id,
    )
    if row is None:
        raise NotFound("rollout", rollout_id)
    return _record(row)


async def list_rollouts(
    con: Connection,
    tenant_id: uuid.UUID,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
    group_id: str,
) -> list[RolloutRecord]:
    """Newest first; `after` is the (created_at, rollout_id) of the last one seen."""
    rows = await con.fetch(
        f"""
        SELECT {_COLUMNS} FROM rollouts
        WHERE tenant_id = $1
          AND ($2::text = '' OR target_group_id = $2)
          AND ($3::timestamptz IS NULL OR (created_at, rollout_id) < ($3, $4::text))
        ORDER BY created_at DESC, rollout_id DESC
        LIMIT $5
        """,
        tenant_id,
        group_id,
        after[0] if after else None,
        after[1] if after else "",
        limit,
    )
    return [_record(r) for r in rows]


def state_conflict(rollout: RolloutRecord, wanted: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"rollout {rollout.rollout_id!r} is {rollout.state}; {wanted}",
        reason=ErrorReason.ROLLOUT_STATE_CONFLICT,
        metadata={"rollout": rollout.rollout_id, "state": rollout.state},
        subject=f"rollouts/{rollout.rollout_id}",
    )


async def change_state(
    con: Connection,
    tenant_id: uuid.UUID,
    rollout_id: str,
    *,
    allowed_from: frozenset[str],
    to: str,
    reason: str,
    wanted: str,
) -> RolloutRecord:
    """Move the rollout from one of `allowed_from` to `to`, waiting for an
    engine's work on it to commit first. Resuming restarts the rate's count.

    Raises NotFound, or FailedPrecondition (ROLLOUT_STATE_CONFLICT, `wanted`
    saying what the call needs) from any other state.
    """
    current = await get(con, tenant_id, rollout_id, lock=True)
    if current.state not in allowed_from:
        raise state_conflict(current, wanted)
    await con.execute(
        """
        UPDATE rollouts
        SET state = $3, state_reason = $4, updated_at = now(), next_check_at = now(),
            ended_at = CASE WHEN $5 THEN now() END,
            rate_since = CASE WHEN $3 = 'RUNNING' THEN now() ELSE rate_since END,
            started_since = CASE WHEN $3 = 'RUNNING' THEN 0 ELSE started_since END
        WHERE tenant_id = $1 AND rollout_id = $2
        """,
        tenant_id,
        rollout_id,
        to,
        reason,
        to in rules.ENDED,
    )
    return await get(con, tenant_id, rollout_id)


async def list_devices(
    con: Connection,
    tenant_id: uuid.UUID,
    rollout_id: str,
    *,
    states: Sequence[str],
    after: str,
    limit: int,
) -> list[DeviceRecord]:
    """In device_id order, after `after`; only `states` unless empty."""
    rows = await con.fetch(
        f"""
        SELECT {_DEVICE_COLUMNS}
        FROM rollout_devices
        WHERE tenant_id = $1 AND rollout_id = $2 AND device_id > $3
          AND (cardinality($4::text[]) = 0 OR state = ANY($4::text[]))
        ORDER BY device_id
        LIMIT $5
        """,
        tenant_id,
        rollout_id,
        after,
        list(states),
        limit,
    )
    return [DeviceRecord(**dict(r.items())) for r in rows]


async def changed_after(
    con: Connection, tenant_id: uuid.UUID, rollout_id: str, after: int, *, limit: int
) -> list[DeviceRecord]:
    """Devices whose state changed after change `after`, in commit order."""
    rows = await con.fetch(
        f"""
        SELECT {_DEVICE_COLUMNS}
        FROM rollout_devices
        WHERE tenant_id = $1 AND rollout_id = $2 AND change_seq > $3
        ORDER BY change_seq
        LIMIT $4
        """,
        tenant_id,
        rollout_id,
        after,
        limit,
    )
    return [DeviceRecord(**dict(r.items())) for r in rows]


async def last_change(con: Connection, tenant_id: uuid.UUID, rollout_id: str) -> int:
    value = await con.fetchval(
        """
        SELECT max(change_seq) FROM rollout_devices
        WHERE tenant_id = $1 AND rollout_id = $2 AND change_seq IS NOT NULL
        """,
        tenant_id,
        rollout_id,
    )
    return int(value or 0)


# --------------------------------------------------------------------------
# The engine


async def due(con: Connection, *, limit: int) -> list[tuple[uuid.UUID, str]]:
    """Rollouts of every tenant with work now: starting devices or waiting
    for outcomes. As the evaluator role."""
    rows = await con.fetch(
        """
        SELECT tenant_id, rollout_id FROM rollouts
        WHERE (state = 'RUNNING' OR applied > 0) AND next_check_at <= now()
        ORDER BY next_check_at
        LIMIT $1
        """,
        limit,
    )
    return [(r["tenant_id"], r["rollout_id"]) for r in rows]


async def lease(
    con: Connection, tenant_id: uuid.UUID, rollout_id: str
) -> tuple[RolloutRecord, datetime] | None:
    """The rollout, locked until the transaction ends, and the transaction's
    time; None if another engine holds it or it has no work now."""
    row = await con.fetchrow(
        f"""
        SELECT {_COLUMNS}, now() AS now FROM rollouts
        WHERE tenant_id = $1 AND rollout_id = $2
          AND (state = 'RUNNING' OR applied > 0) AND next_check_at <= now()
        FOR UPDATE SKIP LOCKED
        """,
        tenant_id,
        rollout_id,
    )
    if row is None:
        return None
    return _record(row), row["now"]


@dataclass(frozen=True, slots=True)
class Applied:
    """An APPLIED device whose outcome may have changed, with its twin (None
    fields: the device was deleted)."""

    device_id: str
    written_version: int
    canary: bool
    deadline: datetime
    revision: int | None
    lifecycle: str | None
    desired: dict[str, Any] | None
    reported: dict[str, Any] | None
    reported_version: int | None


async def applied_to_judge(
    con: Connection, tenant_id: uuid.UUID, rollout_id: str, *, after: str, limit: int
) -> tuple[list[Applied], str]:
    """Of the next `limit` APPLIED devices after `after` (device_id order),
    those whose twin changed since they were last judged, that are past
    their deadline, or that are gone; and the last device_id of the slice
    ('' if it ran to the end)."""
    through = await con.fetchval(
        """
        SELECT device_id FROM rollout_devices
        WHERE tenant_id = $1 AND rollout_id = $2 AND state = 'APPLIED' AND device_id > $3
        ORDER BY device_id
        OFFSET $4 - 1 LIMIT 1
        """,
        tenant_id,
        rollout_id,
        after,
        limit,
    )
    rows = await con.fetch(
        """
        SELECT r.device_id, r.desired_version AS written_version, r.canary, r.deadline,
               s.twin_revision AS revision, d.lifecycle, s.desired, s.reported,
               s.reported_version
        FROM rollout_devices r
        LEFT JOIN device_state s ON s.tenant_id = r.tenant_id AND s.device_id = r.device_id
        LEFT JOIN devices d ON d.tenant_id = r.tenant_id AND d.device_id = r.device_id
        WHERE r.tenant_id = $1 AND r.rollout_id = $2 AND r.state = 'APPLIED'
          AND r.device_id > $3 AND ($4::text IS NULL OR r.device_id <= $4)
          AND (s.twin_revision IS DISTINCT FROM r.seen_revision OR r.deadline <= now()
               OR d.lifecycle IS DISTINCT FROM 'ACTIVE')
        ORDER BY r.device_id
        """,
        tenant_id,
        rollout_id,
        after,
        through,
    )
    return [Applied(**dict(r.items())) for r in rows], through or ""


async def pending(
    con: Connection, tenant_id: uuid.UUID, rollout_id: str, *, limit: int
) -> list[str]:
    rows = await con.fetch(
        """
        SELECT device_id FROM rollout_devices
        WHERE tenant_id = $1 AND rollout_id = $2 AND state = 'PENDING'
        ORDER BY device_id
        LIMIT $3
        """,
        tenant_id,
        rollout_id,
        limit,
    )
    return [r["device_id"] for r in rows]


async def canary_counts(con: Connection, tenant_id: uuid.UUID, rollout_id: str) -> rules.Counts:
    rows = await con.fetch(
        """
        SELECT state, count(*) AS n FROM rollout_devices
        WHERE tenant_id = $1 AND rollout_id = $2 AND canary
        GROUP BY state
        """,
        tenant_id,
        rollout_id,
    )
    return rules.Counts(**{r["state"].lower(): r["n"] for r in rows})


async def first_failed_canary(
    con: Connection, tenant_id: uuid.UUID, rollout_id: str
) -> tuple[str, str, str] | None:
    """(device_id, state, detail) of a canary that FAILED or TIMED_OUT."""
    row = await con.fetchrow(
        """
        SELECT device_id, state, detail FROM rollout_devices
        WHERE tenant_id = $1 AND rollout_id = $2 AND canary
          AND state IN ('FAILED', 'TIMED_OUT')
        ORDER BY ended_at, device_id
        LIMIT 1
        """,
        tenant_id,
        rollout_id,
    )
    return None if row is None else (row["device_id"], row["state"], row["detail"])


@dataclass(frozen=True, slots=True)
class Start:
    """A device the engine wrote (APPLIED), or could not (an end state)."""

    device_id: str
    state: str
    canary: bool
    desired_version: int = 0
    revision: int = -1
    detail: str = ""


async def record_starts(
    con: Connection, tenant_id: uuid.UUID, rollout: RolloutRecord, starts: Sequence[Start]
) -> None:
    """Move PENDING devices to what their start did, in one statement."""
    if not starts:
        return
    await con.execute(
        """
        UPDATE rollout_devices r
        SET state = u.state, canary = u.canary, desired_version = u.version,
            seen_revision = u.revision, detail = u.detail, change_seq = nextval('rollout_changes'),
            applied_at = CASE WHEN u.state = 'APPLIED' THEN now() END,
            deadline = CASE WHEN u.state = 'APPLIED' THEN now() + $7::interval END,
            ended_at = CASE WHEN u.state <> 'APPLIED' THEN now() END
        FROM unnest($3::text[], $4::text[], $5::boolean[], $6::bigint[], $8::bigint[],
                    $9::text[]) AS u (device_id, state, canary, version, revision, detail)
        WHERE r.tenant_id = $1 AND r.rollout_id = $2 AND r.device_id = u.device_id
          AND r.state = 'PENDING'
        """,
        tenant_id,
        rollout.rollout_id,
        [s.device_id for s in starts],
        [s.state for s in starts],
        [s.canary for s in starts],
        [s.desired_version for s in starts],
        rollout.device_timeout,
        [s.revision for s in starts],
        [s.detail for s in starts],
    )


async def record_outcomes(
    con: Connection,
    tenant_id: uuid.UUID,
    rollout_id: str,
    outcomes: Sequence[tuple[str, str, str]],
    seen: Sequence[tuple[str, int]],
) -> None:
    """End APPLIED devices with (device_id, state, detail), and note the
    twin revision of those judged without an outcome."""
    if outcomes:
        await con.execute(
            """
            UPDATE rollout_devices r
            SET state = u.state, detail = u.detail, ended_at = now(),
                change_seq = nextval('rollout_changes')
            FROM unnest($3::text[], $4::text[], $5::text[]) AS u (device_id, state, detail)
            WHERE r.tenant_id = $1 AND r.rollout_id = $2 AND r.device_id = u.device_id
              AND r.state = 'APPLIED'
            """,
            tenant_id,
            rollout_id,
            [o[0] for o in outcomes],
            [o[1] for o in outcomes],
            [o[2] for o in outcomes],
        )
    if seen:
        # Not a state change: the counts' trigger sums nothing for these.
        await con.execute(
            """
            UPDATE rollout_devices r SET seen_revision = u.revision
            FROM unnest($3::text[], $4::bigint[]) AS u (device_id, revision)
            WHERE r.tenant_id = $1 AND r.rollout_id = $2 AND r.device_id = u.device_id
            """,
            tenant_id,
            rollout_id,
            [s[0] for s in seen],
            [s[1] for s in seen],
        )


async def save_progress(
    con: Connection,
    tenant_id: uuid.UUID,
    rollout_id: str,
    *,
    state: str,
    reason: str,
    counted: int,
    next_check_at: datetime,
    next_enrol_at: datetime,
    judged_at: datetime,
    judged_through: str,
) -> None:
    await con.execute(
        """
        UPDATE rollouts
        SET state = $3, state_reason = $4, started_since = started_since + $5,
            next_check_at = $6, next_enrol_at = $7, judged_at = $8, judged_through = $9,
            updated_at = CASE WHEN state <> $3 OR $5 > 0 THEN now() ELSE updated_at END,
            ended_at = CASE WHEN state <> $3 AND $3 IN ('SUCCEEDED', 'ABORTED', 'CANCELLED')
                            THEN now() ELSE ended_at END
        WHERE tenant_id = $1 AND rollout_id = $2
        """,
        tenant_id,
        rollout_id,
        state,
        reason,
        counted,
        next_check_at,
        next_enrol_at,
        judged_at,
        judged_through,
    )


async def counts(con: Connection, tenant_id: uuid.UUID, rollout_id: str) -> rules.Counts:
    row = await con.fetchrow(
        f"SELECT {', '.join(_COUNT_COLUMNS)} FROM rollouts "
        "WHERE tenant_id = $1 AND rollout_id = $2",
        tenant_id,
        rollout_id,
    )
    assert row is not None
    return rules.Counts(**dict(row.items()))
