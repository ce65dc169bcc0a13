"""Authentication and the role table, over the real server."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import jwt
import pulse_client as pc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.auth import Role, TokenVerifier, mint_token
from server.errors import Unauthenticated
from tests.conftest import ClientFactory, Tenant


async def _rejected(connect: ClientFactory, token: str | None) -> pc.PulseError:
    client = await connect(token)
    with pytest.raises(pc.PulseError) as info:
        await client.devices.get("ANY-1")
    return info.value


async def test_missing_and_malformed_tokens(connect: ClientFactory) -> None:
    assert isinstance(await _rejected(connect, None), pc.Unauthenticated)
    error = await _rejected(connect, "not-a-jwt")
    assert isinstance(error, pc.Unauthenticated)
    assert "invalid" in error.message


async def test_expired_token(connect: ClientFactory, tenant: Tenant) -> None:
    old = tenant.token(ttl_s=60, now=time.time() - 3600)
    error = await _rejected(connect, old)
    assert isinstance(error, pc.Unauthenticated)
    assert "expired" in error.message


async def test_token_signed_with_another_key(connect: ClientFactory, tenant: Tenant) -> None:
    forged = mint_token(b"k" * 32, tenant_id=tenant.tenant_id, role=Role.ADMIN)
    error = await _rejected(connect, forged)
    assert isinstance(error, pc.Unauthenticated)
    assert "signature" in error.message


async def test_wrong_audience_and_unknown_role(
    connect: ClientFactory, tenant: Tenant, settings: object
) -> None:
    error = await _rejected(connect, tenant.token(audience="someone-else"))
    assert isinstance(error, pc.Unauthenticated)
    assert "audience" in error.message
    claims = jwt.decode(tenant.token(), options={"verify_signature": False})
    claims["role"] = "superhero"
    from server.auth import _signing_key

    bad_role = jwt.encode(claims, _signing_key(tenant.secret), algorithm="HS256")
    error = await _rejected(connect, bad_role)
    assert "role" in error.message


async def test_role_table(connect: ClientFactory, tenant: Tenant) -> None:
    admin = await connect(tenant.token(Role.ADMIN))
    operator = await connect(tenant.token(Role.OPERATOR))
    viewer = await connect(tenant.token(Role.VIEWER))
    await admin.sites.create("site-1")
    await operator.devices.create("R-1", site_id="site-1")
    assert (await viewer.devices.get("R-1")).device_id == "R-1"
    with pytest.raises(pc.PermissionDenied) as info:
        await viewer.devices.create("R-2")
    assert "operator" in info.value.message
    with pytest.raises(pc.PermissionDenied):
        await operator.sites.create("site-2")
    with pytest.raises(pc.PermissionDenied):
        await operator.devices.decommission("R-1")
    with pytest.raises(pc.NotFound):
        await viewer.devices.get("R-2")


async def test_health_needs_no_token(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="pulse.device.v1.DeviceRegistryService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_rs256_tokens_verify_and_hs256_is_then_refused(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    verifier = TokenVerifier(
        secret=b"s" * 32, audience="pulse", public_key_file=tmp_path / "pub.pem"
    )
    tenant_id = uuid.uuid4()
    claims = {
        "sub": "svc",
        "aud": "pulse",
        "exp": int(time.time()) + 60,
        "tenant_id": str(tenant_id),
        "role": "operator",
    }
    principal = await verifier.verify(jwt.encode(claims, key, algorithm="RS256"))
    assert (principal.tenant_id, principal.role) == (tenant_id, Role.OPERATOR)
    with pytest.raises(Unauthenticated):
        await verifier.verify(mint_token(b"s" * 32, tenant_id=tenant_id, role=Role.ADMIN))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthenticated):
        await verifier.verify(jwt.encode(claims, other, algorithm="RS256"))
