"""All SQL for credentials. Device credentials are tenant data: every
function runs on a tenant-scoped connection and names the tenant too. Service
credentials are not: they are read and written on the login's own connection
(`Database.admin`), which pulse_app has no grant to reach."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server.db import Connection
from server.errors import FailedPrecondition, NotFound

#: Active credentials a device may hold at once: one in use, one rotating in.
MAX_ACTIVE = 2

# last_used_time is written at most this often per credential, so a device
# reconnecting in a loop does not turn every connect into a write.
_TOUCH_EVERY = "1 minute"


def _active(alias: str = "") -> str:
    """SQL true while a credential works (its device aside)."""
    p = f"{alias}." if alias else ""
    return f"{p}revoke_time IS NULL AND ({p}expire_time IS NULL OR {p}expire_time > now())"


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    device_id: str
    credential_id: str
    create_time: datetime
    expire_time: datetime | None
    last_used_time: datetime | None
    revoke_time: datetime | None


@dataclass(frozen=True, slots=True)
class StoredSecret:
    """What checking a device's CONNECT needs to know."""

    secret_hash: str
    active: bool
    revoked: bool
    device_active: bool
    #: last_used_time is recent enough not to be written again (`touch`).
    used_recently: bool


_COLUMNS = "device_id, credential_id, create_time, expire_time, last_used_time, revoke_time"


def _record(row: asyncpg.Record) -> CredentialRecord:
    return CredentialRecord(**dict(row.items()))


async def _lock_device(con: Connection, tenant_id: uuid.UUID, device_id: str) -> str:
    """The device's lifecycle, its row locked so concurrent issues count right."""
    lifecycle = await con.fetchval(
        "SELECT lifecycle FROM devices WHERE tenant_id = $1 AND device_id = $2 FOR UPDATE",
        tenant_id,
        device_id,
    )
    if lifecycle is None:
        raise NotFound("device", device_id)
    return str(lifecycle)


async def create(
    con: Connection,
    tenant_id: uuid.UUID,
    device_id: str,
    *,
    credential_id: str,
    secret_hash: str,
    expire_time: datetime | None,
) -> CredentialRecord:
    if await _lock_device(con, tenant_id, device_id) != "ACTIVE":
        raise FailedPrecondition(
            f"device {device_id!r} is decommissioned and can get no credentials",
            reason=ErrorReason.DEVICE_DECOMMISSIONED,
            subject=f"devices/{device_id}",
        )
    active = await con.fetchval(
        f"SELECT count(*) FROM device_credentials"
        f" WHERE tenant_id = $1 AND device_id = $2 AND {_active()}",
        tenant_id,
        device_id,
    )
    if active >= MAX_ACTIVE:
        raise FailedPrecondition(
            f"device {device_id!r} already has {MAX_ACTIVE} active credentials; "
            "revoke one before creating another",
            reason=ErrorReason.CREDENTIAL_LIMIT_REACHED,
            subject=f"devices/{device_id}",
        )
    row = await con.fetchrow(
        f"""
        INSERT INTO device_credentials
            (tenant_id, device_id, credential_id, secret_hash, expire_time)
        VALUES ($1, $2, $3, $4, $5)
        RETURNING {_COLUMNS}
        """,
        tenant_id,
        device_id,
        credential_id,
        secret_hash,
        expire_time,
    )
    assert row is not None
    return _record(row)


async def list_for_device(
    con: Connection, tenant_id: uuid.UUID, device_id: str
) -> list[CredentialRecord]:
    rows = await con.fetch(
        f"""
        SELECT {_COLUMNS} FROM device_credentials
        WHERE tenant_id = $1 AND device_id = $2
        ORDER BY create_time DESC, credential_id
        """,
        tenant_id,
        device_id,
    )
    if not rows and not await con.fetchval(
        "SELECT true FROM devices WHERE tenant_id = $1 AND device_id = $2", tenant_id, device_id
    ):
        raise NotFound("device", device_id)
    return [_record(r) for r in rows]


async def revoke(
    con: Connection, tenant_id: uuid.UUID, device_id: str, credential_id: str
) -> CredentialRecord:
    """Idempotent: revoking a revoked credential keeps its first revoke_time."""
    row = await con.fetchrow(
        f"""
        UPDATE device_credentials SET revoke_time = coalesce(revoke_time, now())
        WHERE tenant_id = $1 AND device_id = $2 AND credential_id = $3
        RETURNING {_COLUMNS}
        """,
        tenant_id,
        device_id,
        credential_id,
    )
    if row is None:
        if not await con.fetchval(
            "SELECT true FROM devices WHERE tenant_id = $1 AND device_id = $2",
            tenant_id,
            device_id,
        ):
            raise NotFound("device", device_id)
        raise NotFound("credential", credential_id)
    return _record(row)


async def revoke_all(con: Connection, tenant_id: uuid.UUID, device_id: str) -> list[str]:
    """Revoke every active credential of the device; their ids."""
    rows = await con.fetch(
        """
        UPDATE device_credentials SET revoke_time = now()
        WHERE tenant_id = $1 AND device_id = $2 AND revoke_time IS NULL
        RETURNING credential_id
        """,
        tenant_id,
        device_id,
    )
    return [r["credential_id"] for r in rows]


async def stored_secret(
    con: Connection, tenant_id: uuid.UUID, device_id: str, credential_id: str
) -> StoredSecret | None:
    row = await con.fetchrow(
        f"""
        SELECT c.secret_hash, ({_active("c")}) AS active, c.revoke_time IS NOT NULL AS revoked,
               d.lifecycle = 'ACTIVE' AS device_active,
               coalesce(c.last_used_time >= now() - interval '{_TOUCH_EVERY}', false)
                   AS used_recently
        FROM device_credentials c JOIN devices d USING (tenant_id, device_id)
        WHERE c.tenant_id = $1 AND c.device_id = $2 AND c.credential_id = $3
        """,
        tenant_id,
        device_id,
        credential_id,
    )
    return None if row is None else StoredSecret(**dict(row.items()))


async def touch(con: Connection, tenant_id: uuid.UUID, device_id: str, credential_id: str) -> None:
    await con.execute(
        f"""
        UPDATE device_credentials SET last_used_time = now()
        WHERE tenant_id = $1 AND device_id = $2 AND credential_id = $3
          AND (last_used_time IS NULL OR last_used_time < now() - interval '{_TOUCH_EVERY}')
        """,
        tenant_id,
        device_id,
        credential_id,
    )


async def still_active(
    con: Connection, tenant_id: uuid.UUID, keys: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Of (device_id, credential_id) pairs, those whose credential still
    works: active, and its device not decommissioned."""
    devices = [device for device, _ in keys]
    credentials = [credential for _, credential in keys]
    rows = await con.fetch(
        f"""
        SELECT c.device_id, c.credential_id
        FROM unnest($2::text[], $3::text[]) AS k(device_id, credential_id)
        JOIN device_credentials c
          ON c.tenant_id = $1 AND c.device_id = k.device_id AND c.credential_id = k.credential_id
        JOIN devices d ON d.tenant_id = $1 AND d.device_id = c.device_id
        WHERE {_active("c")}
          AND d.lifecycle = 'ACTIVE'
        """,
        tenant_id,
        devices,
        credentials,
    )
    return {(r["device_id"], r["credential_id"]) for r in rows}


async def set_service_secret(con: Connection, name: str, secret_hash: str) -> None:
    """Create the service's credential, or replace its secret."""
    await con.execute(
        """
        INSERT INTO service_credentials (name, secret_hash) VALUES ($1, $2)
        ON CONFLICT (name) DO UPDATE SET secret_hash = excluded.secret_hash, create_time = now()
        """,
        name,
        secret_hash,
    )


async def service_secret(con: Connection, name: str) -> str | None:
    value = await con.fetchval("SELECT secret_hash FROM service_credentials WHERE name = $1", name)
    return None if value is None else str(value)


async def delete_service(con: Connection, name: str) -> bool:
    return (
        await con.fetchval("DELETE FROM service_credentials WHERE name = $1 RETURNING true", name)
        is not None
    )
