"""Tenant isolation, through every RPC and in the database itself."""

from __future__ import annotations

import uuid

import asyncpg
import pulse_client as pc
import pytest

from server.auth import Role
from server.db import Database, create_pool
from tests.conftest import ClientFactory, Tenant, TenantFactory


async def other_tenant(make_tenant: TenantFactory, connect: ClientFactory) -> pc.AsyncPulseClient:
    """An admin client of a second, new tenant."""
    return await connect((await make_tenant()).token(Role.ADMIN))


async def test_tenants_cannot_reach_each_other_through_any_rpc(
    client: pc.AsyncPulseClient, connect: ClientFactory, make_tenant: TenantFactory
) -> None:
    await client.sites.create("site-a")
    await client.devices.create("SHARED-ID", name="mine", site_id="site-a")
    stranger = await other_tenant(make_tenant, connect)

    with pytest.raises(pc.NotFound):
        await stranger.devices.get("SHARED-ID")
    with pytest.raises(pc.NotFound):
        await stranger.devices.update("SHARED-ID", name="hijacked")
    with pytest.raises(pc.NotFound):
        await stranger.devices.decommission("SHARED-ID")
    assert [d async for d in stranger.devices.list()] == []
    assert [s async for s in stranger.sites.list()] == []
    # A site of another tenant does not exist for this one.
    with pytest.raises(pc.InvalidArgument):
        await stranger.devices.create("OTHER-1", site_id="site-a")
    # Ids are per tenant: the stranger can use the same one.
    theirs = await stranger.devices.create("SHARED-ID", name="theirs")
    assert theirs.name == "theirs"

    mine = await client.devices.get("SHARED-ID")
    assert mine.name == "mine"
    assert mine.lifecycle_status == 1


async def test_raw_sql_in_a_tenant_scope_sees_only_that_tenant(
    db: Database,
    tenant: Tenant,
    client: pc.AsyncPulseClient,
    connect: ClientFactory,
    make_tenant: TenantFactory,
) -> None:
    await client.devices.create("RLS-1")
    await client.devices.create("RLS-2")
    stranger = await other_tenant(make_tenant, connect)
    await stranger.devices.create("RLS-X")

    async with db.tenant(tenant.tenant_id) as con:
        assert await con.fetchval("SELECT current_user") == "pulse_app"
        assert (
            await con.fetchval(
                "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
            )
            is False
        )
        # No WHERE on tenant_id at all: RLS alone narrows it.
        ids = [r["device_id"] for r in await con.fetch("SELECT device_id FROM devices")]
        assert sorted(ids) == ["RLS-1", "RLS-2"]
        tenants = await con.fetch("SELECT tenant_id FROM tenants")
        assert [r["tenant_id"] for r in tenants] == [tenant.tenant_id]
        assert await con.fetchval("SELECT count(*) FROM device_state") == 2
        assert await con.fetchval("SELECT count(*) FROM devices WHERE device_id = 'RLS-X'") == 0

    # Writing a row for another tenant is refused by the policy's WITH CHECK.
    foreign = uuid.uuid4()
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.tenant(tenant.tenant_id) as con:
            await con.execute(
                "INSERT INTO devices (tenant_id, device_id) VALUES ($1, 'SNEAK')", foreign
            )


async def test_scope_leaves_nothing_on_the_pooled_connection(dsn: str, tenant: Tenant) -> None:
    single = Database(await create_pool(dsn, size=1))  # so the same connection comes back
    try:
        async with single.tenant(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT current_setting('app.tenant_id')") == str(
                tenant.tenant_id
            )
            backend = await con.fetchval("SELECT pg_backend_pid()")
        async with single.admin() as con:
            assert await con.fetchval("SELECT pg_backend_pid()") == backend
            assert await con.fetchval("SELECT current_setting('app.tenant_id', true)") in ("", None)
            assert await con.fetchval("SELECT current_user") != "pulse_app"
    finally:
        await single.close()


async def test_the_app_role_without_a_tenant_sees_nothing(
    db: Database, client: pc.AsyncPulseClient
) -> None:
    await client.devices.create("UNSCOPED-1")
    async with db.admin() as con, con.transaction():
        await con.execute("SET LOCAL ROLE pulse_app")
        assert await con.fetchval("SELECT count(*) FROM devices") == 0
        assert await con.fetchval("SELECT count(*) FROM tenants") == 0


async def test_a_scope_rolls_back_on_error(db: Database, tenant: Tenant) -> None:
    with pytest.raises(RuntimeError):
        async with db.tenant(tenant.tenant_id) as con:
            await con.execute(
                "INSERT INTO sites (tenant_id, site_id) VALUES ($1, 'gone')", tenant.tenant_id
            )
            raise RuntimeError("boom")
    async with db.tenant(tenant.tenant_id) as con:
        assert await con.fetchval("SELECT count(*) FROM sites") == 0
