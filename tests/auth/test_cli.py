"""`pulse tenant add` and `pulse token` with tenant ids that are not UUIDs,
run as the real command against the session's database."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pulse_client as pc
import pytest

from server.config import Settings
from server.db import Database
from server.tenants import ensure_tenant, tenant_uuid
from tests.auth.conftest import IdentityProvider, KeycloakClients
from tests.conftest import ClientFactory


def _environment(settings: dict[str, str]) -> dict[str, str]:
    """The test's settings only: none of the runner's own PULSE_* or servers."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("PULSE_") and name not in ("DATABASE_URL", "MQTT_URL")
    }
    return {**inherited, **settings}


async def _pulse(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "launcher",
        *args,
        env=_environment(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode().strip(), err.decode()


async def test_tenant_add_creates_the_tenant_an_upstream_id_maps_to(
    dsn: str,
    db: Database,
    idp: IdentityProvider,
    keycloak_client: KeycloakClients,
    tmp_path: Path,
) -> None:
    env = {"DATABASE_URL": dsn, "PULSE_DATA_DIR": str(tmp_path)}
    for _ in range(2):  # idempotent
        code, out, err = await _pulse(
            "tenant", "add", "acme-industrial", "--name", "Acme Industrial", env=env
        )
        assert code == 0, err
        assert uuid.UUID(out) == tenant_uuid("acme-industrial")
    async with db.tenant(uuid.UUID(out), readonly=True) as con:
        row = await con.fetchrow("SELECT name, external_id FROM tenants")
    assert row is not None and tuple(row) == ("Acme Industrial", "acme-industrial")
    # The upstream customer1 of realm-pulse.json, as Keycloak signs it.
    token = idp.token(tenant="acme-industrial", roles=["customer", "offline_access"])
    client = await keycloak_client(token)
    await client.devices.create("ACME-1")
    assert (await client.devices.get("ACME-1")).device_id == "ACME-1"


async def test_tenant_add_with_a_uuid_keeps_no_external_id(
    dsn: str, db: Database, tmp_path: Path
) -> None:
    tenant_id = uuid.uuid4()
    env = {"DATABASE_URL": dsn, "PULSE_DATA_DIR": str(tmp_path)}
    code, out, err = await _pulse("tenant", "add", str(tenant_id).upper(), env=env)
    assert (code, out) == (0, str(tenant_id)), err
    async with db.tenant(tenant_id, readonly=True) as con:
        assert await con.fetchval("SELECT external_id FROM tenants") is None


async def test_bad_tenant_ids_are_refused_before_anything_runs(tmp_path: Path) -> None:
    # No database: the id is checked first.
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "PULSE_DATA_DIR": str(tmp_path)}
    for command in (["tenant", "add", "acme/industrial"], ["token", "--tenant", ""]):
        code, out, err = await _pulse(*command, env=env)
        assert code == 1 and out == ""
        assert "must be 1 to 128 characters" in err


async def test_token_for_an_upstream_tenant_id(
    settings: Settings, db: Database, connect: ClientFactory, tmp_path: Path
) -> None:
    external_id = "globex-corp"
    async with db.admin() as con:
        await ensure_tenant(con, tenant_uuid(external_id), "Globex", external_id=external_id)
    env = {"PULSE_SECRET": settings.secret.decode(), "PULSE_DATA_DIR": str(tmp_path)}
    code, token, err = await _pulse("token", "--tenant", external_id, "--role", "viewer", env=env)
    assert code == 0, err
    client = await connect(token)
    assert [d async for d in client.devices.list()] == []
    with pytest.raises(pc.PermissionDenied):
        await client.devices.create("GLOBEX-1")
