"""Registry CRUD through the typed client, over a real channel and database."""

from __future__ import annotations

import pulse_client as pc
import pytest
from pulse.device.v1 import filter_pb2, status_pb2


async def test_create_get_update_decommission(client: pc.AsyncPulseClient) -> None:
    await client.sites.create("site-01", name="Plant 1")
    created = await client.devices.create(
        "DEVICE-01",
        name="Boiler",
        site_id="site-01",
        model="bx-200",
        tags={"env": "prod", "production": ""},
        metadata={"firmware": "1.2.3", "limits": {"temp_c": 90}},
    )
    assert created.device_id == "DEVICE-01"
    assert created.lifecycle_status == status_pb2.ACTIVE
    assert created.connectivity_status == status_pb2.UNKNOWN
    assert not created.HasField("last_seen_time")
    assert created.create_time.seconds > 0

    fetched = await client.devices.get("DEVICE-01")
    assert fetched == created
    assert dict(fetched.tags) == {"env": "prod", "production": ""}
    assert fetched.metadata.fields["limits"].struct_value.fields["temp_c"].number_value == 90

    updated = await client.devices.update("DEVICE-01", name="Boiler 2", tags={"env": "dev"})
    assert updated.name == "Boiler 2"
    assert dict(updated.tags) == {"env": "dev"}
    assert updated.site_id == "site-01"  # not in the mask, so unchanged
    assert updated.model == "bx-200"
    assert updated.update_time.ToDatetime() >= created.update_time.ToDatetime()

    retired = await client.devices.decommission("DEVICE-01")
    assert retired.lifecycle_status == status_pb2.DECOMMISSIONED
    again = await client.devices.decommission("DEVICE-01")
    assert again.lifecycle_status == status_pb2.DECOMMISSIONED

    with pytest.raises(pc.FailedPrecondition) as info:
        await client.devices.update("DEVICE-01", name="zombie")
    assert info.value.reason == "DEVICE_DECOMMISSIONED"
    assert (await client.devices.get("DEVICE-01")).name == "Boiler 2"


async def test_duplicate_device_is_already_exists(client: pc.AsyncPulseClient) -> None:
    await client.devices.create("DUP-1", name="first")
    with pytest.raises(pc.AlreadyExists) as info:
        await client.devices.create("DUP-1", name="second")
    assert info.value.reason == "DEVICE_ALREADY_EXISTS"
    assert (await client.devices.get("DUP-1")).name == "first"


async def test_unknown_device_is_not_found(client: pc.AsyncPulseClient) -> None:
    with pytest.raises(pc.NotFound) as info:
        await client.devices.get("NOPE-1")
    assert info.value.reason == "DEVICE_NOT_FOUND"
    assert info.value.metadata == {"device": "NOPE-1"}


async def test_unknown_site_is_invalid_argument(client: pc.AsyncPulseClient) -> None:
    with pytest.raises(pc.InvalidArgument) as info:
        await client.devices.create("D-1", site_id="nowhere")
    assert [v.field for v in info.value.field_violations] == ["device.site_id"]
    with pytest.raises(pc.NotFound):
        await client.devices.get("D-1")


async def test_sites_list_in_order(client: pc.AsyncPulseClient) -> None:
    for site in ["b-site", "a-site", "c-site"]:
        await client.sites.create(site, name=site.upper())
    names = [s.site_id async for s in client.sites.list(page_size=2)]
    assert names == ["a-site", "b-site", "c-site"]
    with pytest.raises(pc.AlreadyExists):
        await client.sites.create("a-site")


async def test_list_hides_decommissioned_unless_asked(client: pc.AsyncPulseClient) -> None:
    for n in range(3):
        await client.devices.create(f"L-{n}")
    await client.devices.decommission("L-1")
    active = [d.device_id async for d in client.devices.list()]
    assert active == ["L-0", "L-2"]
    everything = filter_pb2.DeviceFilter(include_decommissioned=True)
    assert [d.device_id async for d in client.devices.list(filter=everything)] == [
        "L-0",
        "L-1",
        "L-2",
    ]


async def test_list_devices_by_filter(client: pc.AsyncPulseClient) -> None:
    await client.sites.create("site-01")
    await client.devices.create("F-1", site_id="site-01", tags={"production": ""})
    await client.devices.create("F-2", site_id="site-01")
    await client.devices.create("F-3", tags={"production": ""})
    upstream = filter_pb2.DeviceFilter(site_id="site-01", tags=["production"])
    assert [d.device_id async for d in client.devices.list(filter=upstream)] == ["F-1"]
