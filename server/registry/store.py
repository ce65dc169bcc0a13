"""All SQL for devices and sites. Every function runs on a tenant-scoped
connection (`Database.tenant`) and also names the tenant explicitly, so the
primary-key index is used and RLS is a second, independent fence."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import filters
from server.db import Connection
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    name: str
    site_id: str | None
    model: str
    tags: dict[str, str]
    metadata: dict[str, Any]
    lifecycle: str
    status: str
    last_seen_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SiteRecord:
    site_id: str
    name: str
    created_at: datetime


# Columns UpdateDevice may set: update_mask path -> column. Nothing else ever
# reaches the SET clause.
UPDATABLE = {
    "name": "name",
    "site_id": "site_id",
    "model": "model",
    "tags": "tags",
    "metadata": "metadata",
}

_DEVICE_COLUMNS = """
    d.device_id, d.name, d.site_id, d.model, d.tags, d.metadata, d.lifecycle,
    s.status, s.last_seen_at, d.created_at, d.updated_at
"""


def _device(row: asyncpg.Record) -> DeviceRecord:
    return DeviceRecord(**dict(row.items()))


async def create_device(
    con: Connection,
    tenant_id: uuid.UUID,
    *,
    device_id: str,
    name: str,
    site_id: str | None,
    model: str,
    tags: dict[str, str],
    metadata: dict[str, Any],
) -> DeviceRecord:
    try:
        row = await con.fetchrow(
            f"""
            WITH d AS (
                INSERT INTO devices (tenant_id, device_id, name, site_id, model, tags, metadata)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                RETURNING *
            ), s AS (
                INSERT INTO device_state (tenant_id, device_id)
                SELECT tenant_id, device_id FROM d
                RETURNING status, last_seen_at
            )
            SELECT {_DEVICE_COLUMNS} FROM d, s
            """,
            tenant_id,
            device_id,
            name,
            site_id,
            model,
            tags,
            metadata,
        )
    except asyncpg.UniqueViolationError as e:
        raise AlreadyExists("device", device_id) from e
    except asyncpg.ForeignKeyViolationError as e:
        raise InvalidArgument.single("device.site_id", f"site {site_id!r} does not exist") from e
    assert row is not None
    return _device(row)


async def get_device(con: Connection, tenant_id: uuid.UUID, device_id: str) -> DeviceRecord:
    row = await con.fetchrow(
        f"""
        SELECT {_DEVICE_COLUMNS}
        FROM devices d JOIN device_state s USING (tenant_id, device_id)
        WHERE d.tenant_id = $1 AND d.device_id = $2
        """,
        tenant_id,
        device_id,
    )
    if row is None:
        raise NotFound("device", device_id)
    return _device(row)


async def list_devices(
    con: Connection,
    tenant_id: uuid.UUID,
    *,
    after: str | None,
    limit: int,
    device_filter: filters.DeviceFilter | None = None,
    stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER,
) -> list[DeviceRecord]:
    """Up to `limit` devices after `after` in device_id order, of those
    `device_filter` selects (`stale_after`: the twin sync rule's threshold)."""
    compiled = filters.compile_filter(
        device_filter or filters.DeviceFilter(), first_param=4, stale_after=stale_after
    )
    if compiled.params:
        await con.execute(filters.CUSTOM_PLANS)
    # The cursor on s too: the planner does not carry an inequality across
    # the join, and a twin condition drives it from device_state.
    rows = await con.fetch(
        f"""
        SELECT {_DEVICE_COLUMNS}
        FROM devices d JOIN device_state s USING (tenant_id, device_id)
        WHERE d.tenant_id = $1 AND d.device_id > $2 AND s.device_id > $2 AND ({compiled.sql})
        ORDER BY d.device_id
        LIMIT $3
        """,
        tenant_id,
        after or "",
        limit,
        *compiled.params,
    )
    return [_device(r) for r in rows]


async def update_device(
    con: Connection, tenant_id: uuid.UUID, device_id: str, changes: dict[str, Any]
) -> DeviceRecord:
    columns = [UPDATABLE[path] for path in changes]
    assignments = ", ".join(f"{col} = ${i}" for i, col in enumerate(columns, start=3))
    try:
        row = await con.fetchrow(
            f"""
            WITH d AS (
                UPDATE devices SET {assignments}, updated_at = now()
                WHERE tenant_id = $1 AND device_id = $2 AND lifecycle = 'ACTIVE'
                RETURNING *
            )
            SELECT {_DEVICE_COLUMNS}
            FROM d JOIN device_state s USING (tenant_id, device_id)
            """,
            tenant_id,
            device_id,
            *changes.values(),
        )
    except asyncpg.ForeignKeyViolationError as e:
        site = changes.get("site_id")
        raise InvalidArgument.single("device.site_id", f"site {site!r} does not exist") from e
    if row is None:
        current = await get_device(con, tenant_id, device_id)  # NotFound if absent
        raise FailedPrecondition(
            f"device {device_id!r} is {current.lifecycle.lower()} and cannot be changed",
            reason=ErrorReason.DEVICE_DECOMMISSIONED,
            metadata={"device": device_id},
            subject=f"devices/{device_id}",
        )
    return _device(row)


async def decommission_device(
    con: Connection, tenant_id: uuid.UUID, device_id: str
) -> DeviceRecord:
    """Idempotent: decommissioning a decommissioned device changes nothing."""
    row = await con.fetchrow(
        f"""
        WITH d AS (
            UPDATE devices SET lifecycle = 'DECOMMISSIONED', updated_at = now()
            WHERE tenant_id = $1 AND device_id = $2 AND lifecycle = 'ACTIVE'
            RETURNING *
        )
        SELECT {_DEVICE_COLUMNS}
        FROM d JOIN device_state s USING (tenant_id, device_id)
        """,
        tenant_id,
        device_id,
    )
    if row is None:
        return await get_device(con, tenant_id, device_id)
    return _device(row)


async def create_site(
    con: Connection, tenant_id: uuid.UUID, *, site_id: str, name: str
) -> SiteRecord:
    try:
        row = await con.fetchrow(
            """
            INSERT INTO sites (tenant_id, site_id, name) VALUES ($1, $2, $3)
            RETURNING site_id, name, created_at
            """,
            tenant_id,
            site_id,
            name,
        )
    except asyncpg.UniqueViolationError as e:
        raise AlreadyExists("site", site_id) from e
    assert row is not None
    return SiteRecord(**dict(row.items()))


async def list_sites(
    con: Connection, tenant_id: uuid.UUID, *, after: str | None, limit: int
) -> list[SiteRecord]:
    rows = await con.fetch(
        """
        SELECT site_id, name, created_at FROM sites
        WHERE tenant_id = $1 AND site_id > $2
        ORDER BY site_id LIMIT $3
        """,
        tenant_id,
        after or "",
        limit,
    )
    return [SiteRecord(**dict(r.items())) for r in rows]
