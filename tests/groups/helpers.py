"""Arranging devices for group tests: straight into the tables, in the
tenant's scope, the way the registry and the liveness evaluator write them."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import pulse_client as pc
from google.protobuf import json_format
from pulse.device.v1 import filter_pb2

from server.db import Database
from server.filters import DeviceRow


async def insert_sites(db: Database, tenant_id: uuid.UUID, site_ids: Iterable[str]) -> None:
    async with db.tenant(tenant_id) as con:
        await con.executemany(
            "INSERT INTO sites (tenant_id, site_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(tenant_id, s) for s in site_ids],
        )


async def insert_rows(db: Database, tenant_id: uuid.UUID, rows: Sequence[DeviceRow]) -> None:
    """Devices and their state exactly as `rows` describe them (sites must exist)."""
    async with db.tenant(tenant_id) as con:
        await con.executemany(
            """
            INSERT INTO devices (tenant_id, device_id, name, site_id, model, tags, lifecycle)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            """,
            [device_values(tenant_id, r) for r in rows],
        )
        await con.executemany(
            """
            INSERT INTO device_state (tenant_id, device_id, status, last_seen_at,
                desired, reported, desired_version, reported_version,
                desired_updated_at, reported_updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            """,
            [state_values(tenant_id, r) for r in rows],
        )


def device_values(tenant_id: uuid.UUID, r: DeviceRow) -> tuple[object, ...]:
    """(tenant, device_id, name, site_id, model, tags, lifecycle) of a row."""
    return (tenant_id, r.device_id, r.name, r.site_id, r.model, dict(r.tags), r.lifecycle)


def state_values(tenant_id: uuid.UUID, r: DeviceRow) -> tuple[object, ...]:
    """(tenant, device_id, status, last_seen_at, desired, reported, desired and
    reported versions, desired and reported update times) of a row."""
    return (
        tenant_id,
        r.device_id,
        r.status,
        r.last_seen_at,
        dict(r.desired),
        dict(r.reported),
        r.desired_version,
        r.reported_version,
        r.desired_updated_at,
        r.reported_updated_at,
    )


async def remove_devices(db: Database, tenant_id: uuid.UUID) -> None:
    """Delete the tenant's devices (their state and memberships go with them).

    Property tests draw device ids no registry call would accept (with MQTT
    wildcards, for one) and twins with desired documents: left behind, they
    would reach every later evaluator's retained repair, which republishes
    every desired document of every tenant.
    """
    async with db.admin() as con:
        await con.execute("DELETE FROM devices WHERE tenant_id = $1", tenant_id)


async def set_status(
    db: Database,
    tenant_id: uuid.UUID,
    device_ids: Iterable[str],
    status: str,
    last_seen_at: datetime | None = None,
) -> None:
    """What the liveness evaluator does when devices change state."""
    async with db.tenant(tenant_id) as con:
        await con.execute(
            """
            UPDATE device_state SET status = $3, last_seen_at = coalesce($4, last_seen_at)
            WHERE tenant_id = $1 AND device_id = ANY($2::text[])
            """,
            tenant_id,
            list(device_ids),
            status,
            last_seen_at,
        )


def row(
    device_id: str,
    *,
    status: str = "ONLINE",
    site_id: str | None = None,
    tags: dict[str, str] | None = None,
    name: str = "",
    model: str = "",
    lifecycle: str = "ACTIVE",
    last_seen_at: datetime | None = None,
    reported: dict[str, Any] | None = None,
    desired: dict[str, Any] | None = None,
) -> DeviceRow:
    return DeviceRow(
        device_id=device_id,
        name=name,
        site_id=site_id,
        model=model,
        tags=tags or {},
        lifecycle=lifecycle,
        status=status,
        last_seen_at=last_seen_at,
        reported=reported or {},
        desired=desired or {},
    )


def twin_condition(document: str, path: str, operator: str, *values: Any) -> dict[str, Any]:
    """A twin condition in its protobuf-JSON form."""
    out: dict[str, Any] = {"document": document, "path": path, "operator": operator}
    if values:
        out["values"] = list(values)
    return out


def filter_message(data: dict[str, Any]) -> filter_pb2.DeviceFilter:
    """A filter's protobuf-JSON form as a message."""
    # protobuf's ParseDict fails on null for a repeated Value field, which
    # proto3 JSON reads as empty; leave such keys out instead.
    conditions = [
        {k: v for k, v in c.items() if not (k == "values" and v is None)}
        for c in data.get("twin_conditions") or []
    ]
    return json_format.ParseDict({**data, "twin_conditions": conditions}, filter_pb2.DeviceFilter())


async def preview_ids(client: pc.AsyncPulseClient, data: dict[str, Any]) -> list[str]:
    """The device ids PreviewFilter selects for a filter in protobuf-JSON form."""
    message = filter_message(data)
    return [m.device_id async for m in client.groups.preview(message, page_size=1000)]


async def evaluated_members(client: pc.AsyncPulseClient, group_id: str) -> set[str]:
    """A group's members evaluated whole, now: a dynamic group's filter
    through PreviewFilter, not through the membership the maintainer keeps
    (which ListGroupMembers reads)."""
    group = await client.groups.get(group_id)
    if group.HasField("query_filter"):
        return {
            m.device_id async for m in client.groups.preview(group.query_filter, page_size=1000)
        }
    return {m.device_id async for m in client.groups.members(group_id, page_size=1000)}


async def maintained_members(db: Database, tenant_id: uuid.UUID, group_id: str) -> list[str]:
    """The membership the maintainer keeps for the group (which
    ListGroupMembers reads, and its events add up to), in device_id order."""
    async with db.tenant(tenant_id, readonly=True) as con:
        rows = await con.fetch(
            "SELECT device_id FROM group_memberships WHERE tenant_id = $1 AND group_id = $2"
            " ORDER BY device_id",
            tenant_id,
            group_id,
        )
    return [r["device_id"] for r in rows]
