"""The connectivity log is append-only in the database itself, and only the
owner's retention job removes events."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pulse_client as pc
import pytest

from server.connectivity import retention
from server.connectivity.transitions import EVALUATOR_ROLE
from server.db import APP_ROLE, Database
from tests.conftest import Tenant

from .conftest import create_devices, flap


async def _as_role(db: Database, role: str, tenant_id: uuid.UUID, sql: str) -> None:
    async with db.admin() as con, con.transaction():
        await con.execute(f"SET LOCAL ROLE {role}")
        await con.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
        await con.execute(sql)


@pytest.mark.parametrize("role", [APP_ROLE, EVALUATOR_ROLE])
@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE connection_events SET details = '{\"forged\": true}'",
        "DELETE FROM connection_events",
        "TRUNCATE connection_events",
    ],
)
async def test_service_roles_cannot_change_or_remove_events(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    fleet_db: Database,
    db: Database,
    role: str,
    sql: str,
) -> None:
    await create_devices(client, ["AO-1"])
    await flap(fleet_db, tenant.tenant_id, ["AO-1"], 2)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_role(db, role, tenant.tenant_id, sql)
    assert len([e async for e in client.connectivity.list("AO-1")]) == 2


async def test_the_trigger_refuses_even_when_a_grant_is_added_by_mistake(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, db: Database
) -> None:
    await create_devices(client, ["AO-2"])
    await flap(fleet_db, tenant.tenant_id, ["AO-2"], 1)
    async with db.admin() as con:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            async with con.transaction():  # rolled back, grant and all
                await con.execute(f"GRANT UPDATE, DELETE ON connection_events TO {APP_ROLE}")
                await con.execute(f"SET LOCAL ROLE {APP_ROLE}")
                await con.execute(
                    "SELECT set_config('app.tenant_id', $1, true)", str(tenant.tenant_id)
                )
                await con.execute("DELETE FROM connection_events")
    assert len([e async for e in client.connectivity.list("AO-2")]) == 1


async def test_the_api_role_cannot_insert_and_nobody_but_the_owner_sets_xact(
    client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    await create_devices(client, ["AO-3"])
    insert = f"""
        INSERT INTO connection_events
            (tenant_id, device_id, event_type, previous_status, status, trigger)
        VALUES ('{tenant.tenant_id}', 'AO-3', 'CONNECTED', 'UNKNOWN', 'ONLINE', 'first_seen')
    """
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_role(db, APP_ROLE, tenant.tenant_id, insert)
    # The evaluator may insert, but not choose the transaction id that
    # orders delivery to watchers.
    forged = insert.replace("trigger)", "trigger, xact)").replace(
        "'first_seen')", "'first_seen', 1)"
    )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_role(db, EVALUATOR_ROLE, tenant.tenant_id, forged)


async def test_retention_deletes_only_old_events_as_the_owner(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, dsn: str
) -> None:
    await create_devices(client, ["RET-1"])
    sent = await flap(fleet_db, tenant.tenant_id, ["RET-1"], 4)
    # Pretend the job runs 10 days from now, keeping 7 days: everything of
    # this test is old then, and other tests' events too; keep 30 and none are.
    later = datetime.now(UTC) + timedelta(days=10)
    assert await retention.purge(dsn, older_than_days=30, now=later) == 0
    deleted = await retention.purge(dsn, older_than_days=7, now=later, batch=3)
    assert deleted >= len(sent)
    assert [e async for e in client.connectivity.list("RET-1")] == []
    with pytest.raises(ValueError):
        await retention.purge(dsn, older_than_days=0)


async def test_pulse_retention_runs_as_a_command(dsn: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "PULSE_DATA_DIR": str(tmp_path),
        "PULSE_EVENT_RETENTION_DAYS": "3650",
    }
    proc = await asyncio.create_subprocess_exec(
        Path(sys.executable).parent / "pulse",
        "retention",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == [
        "deleted 0 connection events older than 3650 days",
        "deleted 0 membership events older than 3650 days",
    ]
