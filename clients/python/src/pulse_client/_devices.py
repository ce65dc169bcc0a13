"""Device registry: devices and sites (``pulse.device.v1.DeviceRegistryService``).

Requests are built once, by the module-level builders, and sent by the thin
async (``AsyncDevices``, ``AsyncSites``) and sync (``Devices``, ``Sites``)
wrappers, which differ only in how they call the RPC helper.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TypeAlias

from google.protobuf import field_mask_pb2, struct_pb2
from pulse.device.v1 import devices_pb2, devices_pb2_grpc, filter_pb2

from ._pages import AsyncPager, Pager
from ._rpc import AsyncRpc, Rpc

__all__ = [
    "AsyncDevices",
    "AsyncSites",
    "Devices",
    "JsonValue",
    "Sites",
]

JsonValue: TypeAlias = (
    str | int | float | bool | Mapping[str, "JsonValue"] | Sequence["JsonValue"] | None
)
"""A JSON-compatible value, as stored in a device's metadata Struct."""


def _struct(values: Mapping[str, JsonValue]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _device(
    device_id: str,
    *,
    name: str | None,
    site_id: str | None,
    model: str | None,
    tags: Mapping[str, str] | None,
    metadata: Mapping[str, JsonValue] | None,
) -> tuple[devices_pb2.Device, list[str]]:
    """The Device message with the given fields set, and the names of those fields."""
    device = devices_pb2.Device(device_id=device_id)
    given: list[str] = []
    if name is not None:
        device.name = name
        given.append("name")
    if site_id is not None:
        device.site_id = site_id
        given.append("site_id")
    if model is not None:
        device.model = model
        given.append("model")
    if tags is not None:
        device.tags.update(tags)
        given.append("tags")
    if metadata is not None:
        device.metadata.CopyFrom(_struct(metadata))
        given.append("metadata")
    return device, given


def create_device_request(
    device_id: str,
    *,
    name: str,
    site_id: str,
    model: str,
    tags: Mapping[str, str] | None,
    metadata: Mapping[str, JsonValue] | None,
) -> devices_pb2.CreateDeviceRequest:
    device, _ = _device(
        device_id, name=name, site_id=site_id, model=model, tags=tags, metadata=metadata
    )
    return devices_pb2.CreateDeviceRequest(device=device)


def update_device_request(
    device_id: str,
    *,
    name: str | None,
    site_id: str | None,
    model: str | None,
    tags: Mapping[str, str] | None,
    metadata: Mapping[str, JsonValue] | None,
) -> devices_pb2.UpdateDeviceRequest:
    device, given = _device(
        device_id, name=name, site_id=site_id, model=model, tags=tags, metadata=metadata
    )
    if not given:
        # An empty update_mask is rejected by the server anyway; failing here
        # saves the round trip and names the real mistake.
        raise ValueError("update() needs at least one of name, site_id, model, tags, metadata")
    return devices_pb2.UpdateDeviceRequest(
        device=device, update_mask=field_mask_pb2.FieldMask(paths=given)
    )


def list_devices_request(
    filter: filter_pb2.DeviceFilter | None, page_size: int, page_token: str
) -> devices_pb2.ListDevicesRequest:
    return devices_pb2.ListDevicesRequest(filter=filter, page_size=page_size, page_token=page_token)


def create_site_request(site_id: str, *, name: str) -> devices_pb2.CreateSiteRequest:
    return devices_pb2.CreateSiteRequest(site=devices_pb2.Site(site_id=site_id, name=name))


def list_sites_request(page_size: int, page_token: str) -> devices_pb2.ListSitesRequest:
    return devices_pb2.ListSitesRequest(page_size=page_size, page_token=page_token)


def _devices_of(response: devices_pb2.ListDevicesResponse) -> Sequence[devices_pb2.Device]:
    return response.devices


def _sites_of(response: devices_pb2.ListSitesResponse) -> Sequence[devices_pb2.Site]:
    return response.sites


def create_credential_request(
    device_id: str, expire_time: datetime | None
) -> devices_pb2.CreateDeviceCredentialRequest:
    request = devices_pb2.CreateDeviceCredentialRequest(device_id=device_id)
    if expire_time is not None:
        if expire_time.tzinfo is None:
            raise ValueError("expire_time must be timezone-aware")
        request.expire_time.FromDatetime(expire_time)
    return request


class AsyncDevices:
    """Devices of the caller's tenant (``client.devices``)."""

    def __init__(self, rpc: AsyncRpc) -> None:
        self._rpc = rpc
        self._stub = devices_pb2_grpc.DeviceRegistryServiceStub(rpc.channel)

    async def create(
        self,
        device_id: str,
        *,
        name: str = "",
        site_id: str = "",
        model: str = "",
        tags: Mapping[str, str] | None = None,
        metadata: Mapping[str, JsonValue] | None = None,
    ) -> devices_pb2.Device:
        """Registers a device; AlreadyExists if the id is taken."""
        request = create_device_request(
            device_id, name=name, site_id=site_id, model=model, tags=tags, metadata=metadata
        )
        return await self._rpc.unary(self._stub.CreateDevice, request)

    async def get(self, device_id: str) -> devices_pb2.Device:
        """Returns one device; NotFound if it is not in the tenant."""
        request = devices_pb2.GetDeviceRequest(device_id=device_id)
        return await self._rpc.unary(self._stub.GetDevice, request)

    def list(
        self, *, filter: filter_pb2.DeviceFilter | None = None, page_size: int = 0
    ) -> AsyncPager[devices_pb2.Device]:
        """Devices in device_id order, optionally filtered; fetched lazily page by page.

        Args:
            filter: Only devices matching it; None matches every active device.
            page_size: Devices per page; 0 lets the server choose.
        """

        async def fetch(token: str) -> devices_pb2.ListDevicesResponse:
            return await self.list_page(list_devices_request(filter, page_size, token))

        return AsyncPager(fetch, _devices_of)

    async def list_page(
        self, request: devices_pb2.ListDevicesRequest
    ) -> devices_pb2.ListDevicesResponse:
        """One raw ListDevices call, for callers that handle page tokens themselves."""
        return await self._rpc.unary(self._stub.ListDevices, request)

    async def update(
        self,
        device_id: str,
        *,
        name: str | None = None,
        site_id: str | None = None,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
        metadata: Mapping[str, JsonValue] | None = None,
    ) -> devices_pb2.Device:
        """Changes exactly the fields passed (``tags={}`` clears the tags).

        Raises:
            ValueError: No field was passed.
        """
        request = update_device_request(
            device_id, name=name, site_id=site_id, model=model, tags=tags, metadata=metadata
        )
        return await self._rpc.unary(self._stub.UpdateDevice, request)

    async def decommission(self, device_id: str) -> devices_pb2.Device:
        """Retires a device and returns it."""
        request = devices_pb2.DecommissionDeviceRequest(device_id=device_id)
        return await self._rpc.unary(self._stub.DecommissionDevice, request)

    async def create_credential(
        self, device_id: str, *, expire_time: datetime | None = None
    ) -> devices_pb2.DeviceCredential:
        """Issues an MQTT credential; its ``secret`` is in this answer only.

        The device connects with ``username``, ``secret`` as the password, and
        the client id ``{tenant_id}/{device_id}``. FailedPrecondition when it
        already has two active credentials or is decommissioned.
        """
        request = create_credential_request(device_id, expire_time)
        return await self._rpc.unary(self._stub.CreateDeviceCredential, request)

    async def list_credentials(self, device_id: str) -> builtins.list[devices_pb2.DeviceCredential]:
        """The device's credentials, active and revoked, newest first; no secrets."""
        request = devices_pb2.ListDeviceCredentialsRequest(device_id=device_id)
        response = await self._rpc.unary(self._stub.ListDeviceCredentials, request)
        return list(response.credentials)

    async def revoke_credential(
        self, device_id: str, credential_id: str
    ) -> devices_pb2.DeviceCredential:
        """Revokes a credential: refused at once, live connections closed within 5 s."""
        request = devices_pb2.RevokeDeviceCredentialRequest(
            device_id=device_id, credential_id=credential_id
        )
        return await self._rpc.unary(self._stub.RevokeDeviceCredential, request)


class AsyncSites:
    """Sites of the caller's tenant (``client.sites``)."""

    def __init__(self, rpc: AsyncRpc) -> None:
        self._rpc = rpc
        self._stub = devices_pb2_grpc.DeviceRegistryServiceStub(rpc.channel)

    async def create(self, site_id: str, *, name: str = "") -> devices_pb2.Site:
        """Creates a site; AlreadyExists if the id is taken."""
        request = create_site_request(site_id, name=name)
        return await self._rpc.unary(self._stub.CreateSite, request)

    def list(self, *, page_size: int = 0) -> AsyncPager[devices_pb2.Site]:
        """Sites in site_id order, fetched lazily page by page."""

        async def fetch(token: str) -> devices_pb2.ListSitesResponse:
            return await self.list_page(list_sites_request(page_size, token))

        return AsyncPager(fetch, _sites_of)

    async def list_page(
        self, request: devices_pb2.ListSitesRequest
    ) -> devices_pb2.ListSitesResponse:
        """One raw ListSites call, for callers that handle page tokens themselves."""
        return await self._rpc.unary(self._stub.ListSites, request)


class Devices:
    """Blocking twin of :class:`AsyncDevices` (``PulseClient.devices``)."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = devices_pb2_grpc.DeviceRegistryServiceStub(rpc.channel)

    def create(
        self,
        device_id: str,
        *,
        name: str = "",
        site_id: str = "",
        model: str = "",
        tags: Mapping[str, str] | None = None,
        metadata: Mapping[str, JsonValue] | None = None,
    ) -> devices_pb2.Device:
        """Registers a device; AlreadyExists if the id is taken."""
        request = create_device_request(
            device_id, name=name, site_id=site_id, model=model, tags=tags, metadata=metadata
        )
        return self._rpc.unary(self._stub.CreateDevice, request)

    def get(self, device_id: str) -> devices_pb2.Device:
        """Returns one device; NotFound if it is not in the tenant."""
        request = devices_pb2.GetDeviceRequest(device_id=device_id)
        return self._rpc.unary(self._stub.GetDevice, request)

    def list(
        self, *, filter: filter_pb2.DeviceFilter | None = None, page_size: int = 0
    ) -> Pager[devices_pb2.Device]:
        """Devices in device_id order; see :meth:`AsyncDevices.list`."""

        def fetch(token: str) -> devices_pb2.ListDevicesResponse:
            return self.list_page(list_devices_request(filter, page_size, token))

        return Pager(fetch, _devices_of)

    def list_page(self, request: devices_pb2.ListDevicesRequest) -> devices_pb2.ListDevicesResponse:
        """One raw ListDevices call, for callers that handle page tokens themselves."""
        return self._rpc.unary(self._stub.ListDevices, request)

    def update(
        self,
        device_id: str,
        *,
        name: str | None = None,
        site_id: str | None = None,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
        metadata: Mapping[str, JsonValue] | None = None,
    ) -> devices_pb2.Device:
        """Changes exactly the fields passed; see :meth:`AsyncDevices.update`."""
        request = update_device_request(
            device_id, name=name, site_id=site_id, model=model, tags=tags, metadata=metadata
        )
        return self._rpc.unary(self._stub.UpdateDevice, request)

    def decommission(self, device_id: str) -> devices_pb2.Device:
        """Retires a device and returns it."""
        request = devices_pb2.DecommissionDeviceRequest(device_id=device_id)
        return self._rpc.unary(self._stub.DecommissionDevice, request)

    def create_credential(
        self, device_id: str, *, expire_time: datetime | None = None
    ) -> devices_pb2.DeviceCredential:
        """Issues an MQTT credential; its ``secret`` is in this answer only."""
        request = create_credential_request(device_id, expire_time)
        return self._rpc.unary(self._stub.CreateDeviceCredential, request)

    def list_credentials(self, device_id: str) -> builtins.list[devices_pb2.DeviceCredential]:
        """The device's credentials, active and revoked, newest first; no secrets."""
        request = devices_pb2.ListDeviceCredentialsRequest(device_id=device_id)
        return list(self._rpc.unary(self._stub.ListDeviceCredentials, request).credentials)

    def revoke_credential(self, device_id: str, credential_id: str) -> devices_pb2.DeviceCredential:
        """Revokes a credential: refused at once, live connections closed within 5 s."""
        request = devices_pb2.RevokeDeviceCredentialRequest(
            device_id=device_id, credential_id=credential_id
        )
        return self._rpc.unary(self._stub.RevokeDeviceCredential, request)


class Sites:
    """Blocking twin of :class:`AsyncSites` (``PulseClient.sites``)."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = devices_pb2_grpc.DeviceRegistryServiceStub(rpc.channel)

    def create(self, site_id: str, *, name: str = "") -> devices_pb2.Site:
        """Creates a site; AlreadyExists if the id is taken."""
        request = create_site_request(site_id, name=name)
        return self._rpc.unary(self._stub.CreateSite, request)

    def list(self, *, page_size: int = 0) -> Pager[devices_pb2.Site]:
        """Sites in site_id order, fetched lazily page by page."""

        def fetch(token: str) -> devices_pb2.ListSitesResponse:
            return self.list_page(list_sites_request(page_size, token))

        return Pager(fetch, _sites_of)

    def list_page(self, request: devices_pb2.ListSitesRequest) -> devices_pb2.ListSitesResponse:
        """One raw ListSites call, for callers that handle page tokens themselves."""
        return self._rpc.unary(self._stub.ListSites, request)
