"""Device credentials through the API: issue, list, revoke, rotate, and how
the broker-side check sees each of them."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pulse_client as pc
import pytest

from server.auth import Role
from server.broker_access.authenticator import Authenticator, Refused
from server.broker_access.rules import DeviceIdentity
from server.credentials import services
from server.db import Database
from tests.conftest import ClientFactory, Tenant, TenantFactory


@pytest.fixture
def authenticator(db: Database) -> Authenticator:
    return Authenticator(db)


async def refusal(authenticator: Authenticator, username: str, secret: str, client_id: str) -> str:
    with pytest.raises(Refused) as info:
        await authenticator.authenticate(username, secret, client_id)
    return info.value.reason


async def test_a_credential_is_shown_once_and_stored_only_as_a_hash(
    client: pc.AsyncPulseClient, tenant: Tenant, db: Database, authenticator: Authenticator
) -> None:
    await client.devices.create("D1")
    cred = await client.devices.create_credential("D1")

    assert cred.device_id == "D1"
    assert cred.username == f"{tenant.tenant_id}/D1/{cred.credential_id}"
    assert len(cred.secret) >= 40
    assert cred.HasField("create_time") and not cred.HasField("expire_time")
    [listed] = await client.devices.list_credentials("D1")
    assert listed.credential_id == cred.credential_id and listed.secret == ""
    async with db.tenant(tenant.tenant_id) as con:
        stored = await con.fetchval("SELECT secret_hash FROM device_credentials")
    assert stored.startswith("scrypt$") and cred.secret not in stored

    identity = await authenticator.authenticate(
        cred.username, cred.secret, f"{tenant.tenant_id}/D1"
    )
    assert identity == DeviceIdentity(tenant.tenant_id, "D1", cred.credential_id)
    [used] = await client.devices.list_credentials("D1")
    assert used.HasField("last_used_time")


async def test_wrong_secret_username_or_client_id_is_refused(
    client: pc.AsyncPulseClient, tenant: Tenant, authenticator: Authenticator
) -> None:
    await client.devices.create("D1")
    await client.devices.create("D2")
    cred = await client.devices.create_credential("D1")
    own = f"{tenant.tenant_id}/D1"

    assert await refusal(authenticator, cred.username, cred.secret + "x", own) == "bad_secret"
    assert await refusal(authenticator, cred.username, cred.secret, "pulse-evaluator") == (
        "client_id"
    )
    assert await refusal(authenticator, cred.username, cred.secret, f"{tenant.tenant_id}/D2") == (
        "client_id"
    )
    other = f"{tenant.tenant_id}/D2/{cred.credential_id}"
    assert await refusal(authenticator, other, cred.secret, f"{tenant.tenant_id}/D2") == (
        "unknown_credential"
    )
    assert await refusal(authenticator, "", "", own) == "anonymous"
    assert await refusal(authenticator, "admin", "admin", own) == "bad_username"


async def test_two_active_credentials_at_most_so_a_device_can_rotate(
    client: pc.AsyncPulseClient, tenant: Tenant, authenticator: Authenticator
) -> None:
    await client.devices.create("D1")
    first = await client.devices.create_credential("D1")
    second = await client.devices.create_credential("D1")
    with pytest.raises(pc.FailedPrecondition) as info:
        await client.devices.create_credential("D1")
    assert info.value.reason == "CREDENTIAL_LIMIT_REACHED"

    revoked = await client.devices.revoke_credential("D1", first.credential_id)
    assert revoked.HasField("revoke_time")
    client_id = f"{tenant.tenant_id}/D1"
    assert await refusal(authenticator, first.username, first.secret, client_id) == "revoked"
    await authenticator.authenticate(second.username, second.secret, client_id)
    third = await client.devices.create_credential("D1")
    listed = await client.devices.list_credentials("D1")
    assert [c.credential_id for c in listed] == [
        third.credential_id,
        second.credential_id,
        first.credential_id,
    ]
    # Revoking again changes nothing.
    again = await client.devices.revoke_credential("D1", first.credential_id)
    assert again.revoke_time == revoked.revoke_time


async def test_concurrent_issues_never_exceed_two(client: pc.AsyncPulseClient) -> None:
    await client.devices.create("D1")
    results = await asyncio.gather(
        *(client.devices.create_credential("D1") for _ in range(6)), return_exceptions=True
    )
    issued = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, pc.FailedPrecondition)]
    assert (len(issued), len(refused)) == (2, 4)


async def test_expiry_is_checked_and_enforced(
    client: pc.AsyncPulseClient, tenant: Tenant, db: Database, authenticator: Authenticator
) -> None:
    await client.devices.create("D1")
    for bad in (datetime.now(UTC) - timedelta(minutes=1), datetime.now(UTC) + timedelta(days=4000)):
        with pytest.raises(pc.InvalidArgument) as info:
            await client.devices.create_credential("D1", expire_time=bad)
        assert [v.field for v in info.value.field_violations] == ["expire_time"]
    assert await client.devices.list_credentials("D1") == []

    expiry = datetime.now(UTC) + timedelta(days=30)
    cred = await client.devices.create_credential("D1", expire_time=expiry)
    assert cred.expire_time.ToDatetime(tzinfo=UTC) == expiry.replace(microsecond=expiry.microsecond)
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute("UPDATE device_credentials SET expire_time = now() - interval '1 s'")
    client_id = f"{tenant.tenant_id}/D1"
    assert await refusal(authenticator, cred.username, cred.secret, client_id) == "expired"
    # An expired credential no longer counts against the limit.
    await client.devices.create_credential("D1")
    await client.devices.create_credential("D1")


async def test_decommissioning_revokes_every_credential(
    client: pc.AsyncPulseClient, tenant: Tenant, authenticator: Authenticator
) -> None:
    await client.devices.create("D1")
    cred = await client.devices.create_credential("D1")
    await client.devices.decommission("D1")

    [listed] = await client.devices.list_credentials("D1")
    assert listed.HasField("revoke_time")
    client_id = f"{tenant.tenant_id}/D1"
    assert await refusal(authenticator, cred.username, cred.secret, client_id) == "revoked"
    with pytest.raises(pc.FailedPrecondition) as info:
        await client.devices.create_credential("D1")
    assert info.value.reason == "DEVICE_DECOMMISSIONED"


async def test_unknown_and_malformed_names(client: pc.AsyncPulseClient) -> None:
    with pytest.raises(pc.NotFound) as info:
        await client.devices.create_credential("NOPE")
    assert info.value.reason == "DEVICE_NOT_FOUND"
    with pytest.raises(pc.NotFound):
        await client.devices.list_credentials("NOPE")
    await client.devices.create("D1")
    with pytest.raises(pc.NotFound) as info:
        await client.devices.revoke_credential("D1", "0123456789ab")
    assert info.value.reason == "CREDENTIAL_NOT_FOUND"
    with pytest.raises(pc.InvalidArgument) as bad:
        await client.devices.revoke_credential("D1", "'; DROP TABLE devices; --")
    assert [v.field for v in bad.value.field_violations] == ["credential_id"]


async def test_credentials_belong_to_their_tenant(
    client: pc.AsyncPulseClient, make_tenant: TenantFactory, connect: ClientFactory
) -> None:
    await client.devices.create("D1")
    cred = await client.devices.create_credential("D1")
    stranger = await connect((await make_tenant()).token(Role.ADMIN))
    with pytest.raises(pc.NotFound):
        await stranger.devices.list_credentials("D1")
    with pytest.raises(pc.NotFound):
        await stranger.devices.create_credential("D1")
    with pytest.raises(pc.NotFound):
        await stranger.devices.revoke_credential("D1", cred.credential_id)
    assert len(await client.devices.list_credentials("D1")) == 1


async def test_only_admins_issue_and_revoke(
    client: pc.AsyncPulseClient, tenant: Tenant, connect: ClientFactory
) -> None:
    await client.devices.create("D1")
    cred = await client.devices.create_credential("D1")
    for role in (Role.VIEWER, Role.OPERATOR):
        other = await connect(tenant.token(role))
        assert len(await other.devices.list_credentials("D1")) == 1
        with pytest.raises(pc.PermissionDenied):
            await other.devices.create_credential("D1")
        with pytest.raises(pc.PermissionDenied):
            await other.devices.revoke_credential("D1", cred.credential_id)


async def test_service_credentials_are_out_of_every_tenants_reach(
    db: Database, tenant: Tenant, authenticator: Authenticator
) -> None:
    name = f"svc-{uuid.uuid4().hex[:8]}"
    secret = await services.issue(db, name)
    identity = await authenticator.authenticate(f"pulse-{name}", secret, "pulse-evaluator")
    assert identity.username == f"pulse-{name}"
    # A service may not pose as a device's session.
    assert await refusal(authenticator, f"pulse-{name}", secret, f"{tenant.tenant_id}/D1") == (
        "client_id"
    )
    # Issuing again replaces the secret.
    await services.issue(db, name)
    assert await refusal(authenticator, f"pulse-{name}", secret, "x") == "bad_secret"
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.tenant(tenant.tenant_id, readonly=True) as con:
            await con.fetch("SELECT * FROM service_credentials")
