"""Keyset pagination: stable across inserts, opaque and tamper-evident tokens."""

from __future__ import annotations

import base64

import pulse_client as pc
import pytest
from pulse.device.v1 import devices_pb2, filter_pb2

from server.db import Database
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.registry.test_tenancy import other_tenant


async def _page(
    client: pc.AsyncPulseClient, token: str = "", size: int = 10, **kw: object
) -> devices_pb2.ListDevicesResponse:
    request = devices_pb2.ListDevicesRequest(page_size=size, page_token=token, **kw)  # type: ignore[arg-type]
    return await client.devices.list_page(request)


async def test_pages_skip_and_repeat_nothing_while_devices_are_added(
    client: pc.AsyncPulseClient,
) -> None:
    for n in range(0, 50, 2):  # even ids now, odd ids between pages
        await client.devices.create(f"P-{n:03d}")
    seen: list[str] = []
    token = ""
    odds = list(range(1, 50, 2))
    odd = iter(n for pair in zip(odds, reversed(odds), strict=True) for n in pair)  # 1, 49, 3, ...
    added: dict[str, str] = {}  # inserted id -> the cursor when it was inserted
    while True:
        page = await _page(client, token, size=7)
        seen += [d.device_id for d in page.devices]
        for _ in range(3):
            new_id = f"P-{next(odd, 0):03d}"
            if new_id != "P-000" and page.next_page_token and new_id not in added:
                added[new_id] = seen[-1]
                await client.devices.create(new_id)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)), "a device came twice"
    assert seen == sorted(seen)
    # Everything that existed at the start was returned.
    assert {f"P-{n:03d}" for n in range(0, 50, 2)} <= set(seen)
    # Ids inserted ahead of the cursor were returned, behind it were not.
    assert any(i > c for i, c in added.items()) and any(i < c for i, c in added.items())
    for device_id, cursor in added.items():
        assert (device_id in seen) == (device_id > cursor), device_id
    everything = [d.device_id async for d in client.devices.list(page_size=1000)]
    assert len(everything) == 25 + len(added)


async def test_last_full_page_has_no_token(client: pc.AsyncPulseClient) -> None:
    for n in range(4):
        await client.devices.create(f"E-{n}")
    first = await _page(client, size=2)
    second = await _page(client, first.next_page_token, size=2)
    assert [d.device_id for d in second.devices] == ["E-2", "E-3"]
    assert second.next_page_token == ""


async def test_token_is_opaque(client: pc.AsyncPulseClient) -> None:
    for n in range(3):
        await client.devices.create(f"SECRET-ID-{n}")
    token = (await _page(client, size=1)).next_page_token
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"SECRET-ID" not in raw
    assert token.isascii()


async def test_tampered_token_is_invalid_argument(client: pc.AsyncPulseClient) -> None:
    for n in range(3):
        await client.devices.create(f"T-{n}")
    token = (await _page(client, size=1)).next_page_token
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    for bad in [flipped, "not-a-token", "", "A" * 10]:
        if not bad:
            continue
        with pytest.raises(pc.InvalidArgument) as info:
            await _page(client, bad, size=1)
        assert info.value.field_violations[0].field == "page_token"


async def test_token_of_another_tenant_is_refused(
    client: pc.AsyncPulseClient, connect: ClientFactory, make_tenant: TenantFactory
) -> None:
    for n in range(3):
        await client.devices.create(f"X-{n}")
    token = (await _page(client, size=1)).next_page_token
    other = await other_tenant(make_tenant, connect)
    with pytest.raises(pc.InvalidArgument) as info:
        await _page(other, token, size=1)
    assert "another caller" in info.value.message


async def test_token_with_changed_filter_is_refused(client: pc.AsyncPulseClient) -> None:
    for n in range(3):
        await client.devices.create(f"C-{n}")
    token = (await _page(client, size=1)).next_page_token
    narrowed = filter_pb2.DeviceFilter(device_id_prefix="C-")
    with pytest.raises(pc.InvalidArgument) as info:
        await _page(client, token, size=1, filter=narrowed)
    assert "other parameters" in info.value.message


async def test_page_size_default_and_clamp(
    client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute(
            """
            WITH d AS (
                INSERT INTO devices (tenant_id, device_id)
                SELECT $1, 'S-' || lpad(n::text, 4, '0') FROM generate_series(1, 1005) n
                RETURNING tenant_id, device_id
            )
            INSERT INTO device_state (tenant_id, device_id) SELECT * FROM d
            """,
            tenant.tenant_id,
        )
    assert len((await _page(client, size=0)).devices) == 50
    assert len((await _page(client, size=3)).devices) == 3
    clamped = await _page(client, size=5000)
    assert len(clamped.devices) == 1000
    assert clamped.next_page_token


async def test_negative_page_size_is_invalid(client: pc.AsyncPulseClient) -> None:
    with pytest.raises(pc.InvalidArgument) as info:
        await _page(client, size=-1)
    assert info.value.field_violations[0].field == "page_size"
