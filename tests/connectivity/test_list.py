"""ListConnectionEvents: per device (upstream's `limit`) and per tenant,
newest first, filtered, with keyset pages that stay stable as events arrive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pulse_client as pc
import pytest
from pulse.device.v1 import connectivity_pb2

from server.auth import Role
from server.db import Database
from tests.conftest import ClientFactory, Tenant, TenantFactory

from .conftest import create_devices, flap


async def test_a_devices_events_newest_first_with_upstreams_limit(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database
) -> None:
    await create_devices(client, ["L-1", "L-2"])
    sent = await flap(fleet_db, tenant.tenant_id, ["L-1", "L-2"], 5)
    mine = [t for t in sent if t.device_id == "L-1"]

    page = await client.connectivity.list_page(
        connectivity_pb2.ListConnectionEventsRequest(device_id="L-1", limit=3)
    )
    assert [e.id for e in page.events] == [t.event_id for t in reversed(mine)][:3]
    assert page.next_page_token
    newest = page.events[0]
    assert newest.device_id == "L-1"
    assert newest.event_type == connectivity_pb2.CONNECTED  # the 5th flap is online
    assert newest.timestamp.seconds > 0

    every = [e.id async for e in client.connectivity.list("L-1", page_size=2)]
    assert every == [t.event_id for t in reversed(mine)]
    tenant_wide = [e.id async for e in client.connectivity.list(page_size=4)]
    assert tenant_wide == [t.event_id for t in reversed(sent)]


async def test_filters_by_time_range_and_event_type(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database
) -> None:
    await create_devices(client, ["F-1"])
    early = await flap(fleet_db, tenant.tenant_id, ["F-1"], 2)
    split = datetime.now(UTC)
    late = await flap(fleet_db, tenant.tenant_id, ["F-1"], 2)

    after = [e.id async for e in client.connectivity.list("F-1", start_time=split)]
    assert after == [t.event_id for t in reversed(late)]
    before = [e.id async for e in client.connectivity.list(end_time=split)]
    assert before == [t.event_id for t in reversed(early)]
    offline = [
        e.id
        async for e in client.connectivity.list(
            "F-1", event_types=[connectivity_pb2.DISCONNECTED], start_time=split
        )
    ]
    assert offline == [t.event_id for t in reversed(late) if t.event_type == "DISCONNECTED"]
    empty = [e async for e in client.connectivity.list(start_time=split + timedelta(days=1))]
    assert empty == []


async def test_pages_stay_stable_while_new_events_arrive(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database
) -> None:
    await create_devices(client, ["P-1", "P-2"])
    old = await flap(fleet_db, tenant.tenant_id, ["P-1", "P-2"], 5)  # 10 events
    request = connectivity_pb2.ListConnectionEventsRequest(page_size=4)
    first = await client.connectivity.list_page(request)
    await flap(fleet_db, tenant.tenant_id, ["P-1", "P-2"], 3)  # 6 newer events
    seen = [e.id for e in first.events]
    token = first.next_page_token
    while token:
        page = await client.connectivity.list_page(
            connectivity_pb2.ListConnectionEventsRequest(page_size=4, page_token=token)
        )
        seen += [e.id for e in page.events]
        token = page.next_page_token
    assert seen == [t.event_id for t in reversed(old)]


async def test_unknown_devices_bad_input_and_foreign_tokens_are_refused(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    fleet_db: Database,
    make_tenant: TenantFactory,
    connect: ClientFactory,
) -> None:
    await create_devices(client, ["B-1", "B-QUIET"])
    await flap(fleet_db, tenant.tenant_id, ["B-1"], 3)

    with pytest.raises(pc.NotFound) as not_found:
        await client.connectivity.list_page(
            connectivity_pb2.ListConnectionEventsRequest(device_id="NOPE")
        )
    assert not_found.value.reason == "DEVICE_NOT_FOUND"
    assert [e async for e in client.connectivity.list("B-QUIET")] == []

    cases = {
        "limit": connectivity_pb2.ListConnectionEventsRequest(limit=5, page_size=6),
        "page_size": connectivity_pb2.ListConnectionEventsRequest(page_size=-1),
        "event_types[0]": connectivity_pb2.ListConnectionEventsRequest(
            event_types=[connectivity_pb2.CONNECTION_EVENT_TYPE_UNSPECIFIED]
        ),
        "device_id": connectivity_pb2.ListConnectionEventsRequest(device_id="bad id"),
        "page_token": connectivity_pb2.ListConnectionEventsRequest(page_token="garbage"),
    }
    for field, request in cases.items():
        with pytest.raises(pc.InvalidArgument) as info:
            await client.connectivity.list_page(request)
        assert [v.field for v in info.value.field_violations] == [field]
    now = datetime.now(UTC)
    with pytest.raises(pc.InvalidArgument) as info:
        [e async for e in client.connectivity.list("B-1", start_time=now, end_time=now)]
    assert [v.field for v in info.value.field_violations] == ["end_time"]

    page = await client.connectivity.list_page(
        connectivity_pb2.ListConnectionEventsRequest(page_size=1)
    )
    with pytest.raises(pc.InvalidArgument):  # the filter changed between pages
        await client.connectivity.list_page(
            connectivity_pb2.ListConnectionEventsRequest(
                page_size=1, page_token=page.next_page_token, device_id="B-1"
            )
        )
    other = await make_tenant()
    other_client = await connect(other.token(Role.VIEWER))
    with pytest.raises(pc.InvalidArgument):
        await other_client.connectivity.list_page(
            connectivity_pb2.ListConnectionEventsRequest(
                page_size=1, page_token=page.next_page_token
            )
        )
    # Viewers may read; another tenant's events do not exist for them.
    assert [e async for e in other_client.connectivity.list()] == []
    with pytest.raises(pc.NotFound):
        await other_client.connectivity.list_page(
            connectivity_pb2.ListConnectionEventsRequest(device_id="B-1")
        )
