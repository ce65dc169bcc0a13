"""Paging and the registry wrappers, against a fake DeviceRegistryService served
by a real grpc.aio server under the real method names."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
import grpc.aio
import pulse_client as pc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from pulse.device.v1 import devices_pb2, filter_pb2

SERVICE = "pulse.device.v1.DeviceRegistryService"

# Strings: grpc's runtime classes are not all subscriptable.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

# page token -> (device ids on that page, next page token)
DEVICE_PAGES = {"": (["a", "b"], "p2"), "p2": (["c"], "p3"), "p3": (["d", "e"], "")}


@dataclass
class Registry:
    """The requests the fake registry received, in order."""

    requests: list[Message] = field(default_factory=list)

    def of(self, kind: type[Message]) -> list[Any]:
        return [r for r in self.requests if isinstance(r, kind)]


def _handlers(registry: Registry) -> dict[str, Handler]:
    async def list_devices(
        request: devices_pb2.ListDevicesRequest, context: Context
    ) -> devices_pb2.ListDevicesResponse:
        registry.requests.append(request)
        ids, token = DEVICE_PAGES[request.page_token]
        devices = [devices_pb2.Device(device_id=i) for i in ids]
        return devices_pb2.ListDevicesResponse(devices=devices, next_page_token=token)

    async def list_sites(
        request: devices_pb2.ListSitesRequest, context: Context
    ) -> devices_pb2.ListSitesResponse:
        registry.requests.append(request)
        return devices_pb2.ListSitesResponse(sites=[devices_pb2.Site(site_id="s1")])

    async def create_device(
        request: devices_pb2.CreateDeviceRequest, context: Context
    ) -> devices_pb2.Device:
        registry.requests.append(request)
        return request.device

    async def update_device(
        request: devices_pb2.UpdateDeviceRequest, context: Context
    ) -> devices_pb2.Device:
        registry.requests.append(request)
        return request.device

    async def create_site(
        request: devices_pb2.CreateSiteRequest, context: Context
    ) -> devices_pb2.Site:
        registry.requests.append(request)
        return request.site

    def unary(
        behavior: Callable[..., object], request: type[Message], response: type[Message]
    ) -> Handler:
        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    return {
        "ListDevices": unary(
            list_devices, devices_pb2.ListDevicesRequest, devices_pb2.ListDevicesResponse
        ),
        "ListSites": unary(list_sites, devices_pb2.ListSitesRequest, devices_pb2.ListSitesResponse),
        "CreateDevice": unary(create_device, devices_pb2.CreateDeviceRequest, devices_pb2.Device),
        "UpdateDevice": unary(update_device, devices_pb2.UpdateDeviceRequest, devices_pb2.Device),
        "CreateSite": unary(create_site, devices_pb2.CreateSiteRequest, devices_pb2.Site),
    }


@dataclass
class Served:
    target: str
    registry: Registry


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    registry = Registry()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, _handlers(registry))]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(f"127.0.0.1:{port}", registry)
    finally:
        await server.stop(None)


@pytest.fixture
async def client(served: Served) -> AsyncIterator[pc.AsyncPulseClient]:
    async with await pc.AsyncPulseClient.connect(served.target, token="t") as client:
        yield client


async def test_iterates_items_across_three_pages(
    client: pc.AsyncPulseClient, served: Served
) -> None:
    wanted = filter_pb2.DeviceFilter(device_id_prefix="x")
    pager = client.devices.list(filter=wanted, page_size=2)
    assert served.registry.requests == []  # nothing is fetched before iterating
    assert [d.device_id async for d in pager] == ["a", "b", "c", "d", "e"]
    requests = served.registry.of(devices_pb2.ListDevicesRequest)
    assert [r.page_token for r in requests] == ["", "p2", "p3"]
    assert all(r.page_size == 2 and r.filter == wanted for r in requests)


async def test_pages_yield_each_page(client: pc.AsyncPulseClient) -> None:
    pages = [page async for page in client.devices.list().pages]
    assert [[d.device_id for d in page] for page in pages] == [["a", "b"], ["c"], ["d", "e"]]
    assert [page.next_page_token for page in pages] == ["p2", "p3", ""]
    assert isinstance(pages[0].response, devices_pb2.ListDevicesResponse)
    assert len(pages[2]) == 2 and pages[2][-1].device_id == "e"


async def test_stopping_early_fetches_no_further_page(
    client: pc.AsyncPulseClient, served: Served
) -> None:
    pager = client.devices.list()
    async for device in pager:
        assert device.device_id == "a"
        break
    assert len(served.registry.requests) == 1
    # A new iteration starts over from the first page.
    assert [d.device_id async for d in pager][:1] == ["a"]
    requests = served.registry.of(devices_pb2.ListDevicesRequest)
    assert [r.page_token for r in requests] == ["", "", "p2", "p3"]


async def test_list_page_is_one_raw_call(client: pc.AsyncPulseClient) -> None:
    page = await client.devices.list_page(devices_pb2.ListDevicesRequest(page_token="p2"))
    assert [d.device_id for d in page.devices] == ["c"]
    assert page.next_page_token == "p3"


async def test_sites(client: pc.AsyncPulseClient, served: Served) -> None:
    site = await client.sites.create("s1", name="Plant")
    assert (site.site_id, site.name) == ("s1", "Plant")
    assert [s.site_id async for s in client.sites.list(page_size=5)] == ["s1"]
    (request,) = served.registry.of(devices_pb2.ListSitesRequest)
    assert request.page_size == 5


async def test_create_sends_every_field(client: pc.AsyncPulseClient) -> None:
    device = await client.devices.create(
        "D-1",
        name="Boiler",
        site_id="s1",
        model="bx",
        tags={"env": "prod", "bare": ""},
        metadata={"fw": "1.2", "limits": {"temp": 90, "on": True}, "list": [1, None]},
    )
    assert (device.device_id, device.name, device.site_id, device.model) == (
        "D-1",
        "Boiler",
        "s1",
        "bx",
    )
    assert dict(device.tags) == {"env": "prod", "bare": ""}
    expected = struct_pb2.Struct()
    expected.update({"fw": "1.2", "limits": {"temp": 90, "on": True}, "list": [1, None]})
    assert device.metadata == expected


async def test_update_mask_names_exactly_the_given_fields(
    client: pc.AsyncPulseClient, served: Served
) -> None:
    await client.devices.update("D-1", name="n", tags={})
    await client.devices.update("D-1", site_id="", model="m", metadata={"k": "v"})
    first, second = served.registry.of(devices_pb2.UpdateDeviceRequest)
    assert list(first.update_mask.paths) == ["name", "tags"]
    assert first.device.device_id == "D-1" and first.device.name == "n"
    assert list(second.update_mask.paths) == ["site_id", "model", "metadata"]
    with pytest.raises(ValueError, match="at least one"):
        await client.devices.update("D-1")
    assert len(served.registry.requests) == 2


def _sync_run(target: str) -> tuple[list[str], list[int], str]:
    with pc.PulseClient.connect(target, token="t") as client:
        items = [d.device_id for d in client.devices.list(page_size=2)]
        sizes = [len(page) for page in client.devices.list().pages]
        updated = client.devices.update("D-9", name="sync")
        return items, sizes, updated.name


async def test_sync_pager_and_calls(served: Served) -> None:
    # The sync client blocks, so it runs in a thread while this loop serves.
    items, sizes, name = await asyncio.to_thread(_sync_run, served.target)
    assert items == ["a", "b", "c", "d", "e"]
    assert sizes == [2, 1, 2]
    assert name == "sync"
