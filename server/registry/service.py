"""DeviceRegistryService: parse and check the request, call the store, convert."""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Any

import grpc
from pulse.device.v1 import devices_pb2, devices_pb2_grpc, filter_pb2

from server import filters, protoconv
from server import validation as v
from server.auth import current_principal
from server.broker_access.mirror import AccessMirror, NoMirror
from server.broker_access.rules import DeviceIdentity
from server.credentials import hashing
from server.credentials import store as credentials
from server.db import Database
from server.errors import FieldViolation, InvalidArgument
from server.pagination import PageTokens, page_size
from server.registry import convert, store

Context = grpc.aio.ServicerContext[Any, Any]


def _checked_device_fields(device: devices_pb2.Device, paths: set[str]) -> dict[str, Any]:
    """The named fields of `device`, validated, as store values."""
    out: list[FieldViolation] = []
    values: dict[str, Any] = {}
    if "name" in paths:
        v.check_text("device.name", device.name, v.NAME_MAX, out)
        values["name"] = device.name
    if "site_id" in paths:
        if device.site_id:
            v.check_id("device.site_id", device.site_id, out)
        values["site_id"] = device.site_id or None
    if "model" in paths:
        v.check_text("device.model", device.model, v.MODEL_MAX, out)
        values["model"] = device.model
    if "tags" in paths:
        v.check_tags("device.tags", device.tags, out)
        values["tags"] = dict(device.tags)
    if "metadata" in paths:
        try:
            metadata = protoconv.struct_to_dict("device.metadata", device.metadata)
        except InvalidArgument as e:
            out.extend(e.violations)
        else:
            v.check_document("device.metadata", metadata, v.METADATA_MAX_BYTES, out)
            values["metadata"] = metadata
    v.raise_if(out)
    return values


def parse_device_filter(message: filter_pb2.DeviceFilter) -> filters.DeviceFilter:
    out: list[FieldViolation] = []
    parsed = protoconv.parse_request_filter(message, field="filter", out=out)
    if parsed is None:
        raise InvalidArgument(out)
    return parsed


class DeviceRegistryService(devices_pb2_grpc.DeviceRegistryServiceServicer):
    def __init__(
        self,
        db: Database,
        tokens: PageTokens,
        mirror: AccessMirror | None = None,
        *,
        stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER,
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._mirror = mirror or NoMirror()
        # The twin sync rule's threshold, for filters on sync status.
        self._stale_after = stale_after

    async def CreateDevice(
        self, request: devices_pb2.CreateDeviceRequest, context: Context
    ) -> devices_pb2.Device:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device.device_id", request.device.device_id)
        fields = _checked_device_fields(request.device, set(store.UPDATABLE))
        async with self._db.tenant(tenant) as con:
            record = await store.create_device(con, tenant, device_id=device_id, **fields)
        return convert.device(record)

    async def GetDevice(
        self, request: devices_pb2.GetDeviceRequest, context: Context
    ) -> devices_pb2.Device:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        async with self._db.tenant(tenant, readonly=True) as con:
            record = await store.get_device(con, tenant, device_id)
        return convert.device(record)

    async def ListDevices(
        self, request: devices_pb2.ListDevicesRequest, context: Context
    ) -> devices_pb2.ListDevicesResponse:
        tenant = current_principal().tenant_id
        size = page_size(request.page_size)
        device_filter = parse_device_filter(request.filter)
        listing = self._tokens.listing("devices", tenant, filters.canonical_text(device_filter))
        start = listing.start(request.page_token)
        async with self._db.tenant(tenant, readonly=True) as con:
            rows = await store.list_devices(
                con,
                tenant,
                after=str(start[0]) if start is not None else None,
                limit=size + 1,
                device_filter=device_filter,
                stale_after=self._stale_after,
            )
        records, token = listing.page(rows, size, key=lambda d: [d.device_id])
        return devices_pb2.ListDevicesResponse(
            devices=[convert.device(r) for r in records], next_page_token=token
        )

    async def UpdateDevice(
        self, request: devices_pb2.UpdateDeviceRequest, context: Context
    ) -> devices_pb2.Device:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device.device_id", request.device.device_id)
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument.single(
                "update_mask", f"name at least one of: {', '.join(sorted(store.UPDATABLE))}"
            )
        unknown = [p for p in paths if p not in store.UPDATABLE]
        if unknown:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "update_mask.paths",
                        f"{p!r} cannot be updated; allowed: {', '.join(sorted(store.UPDATABLE))}",
                    )
                    for p in unknown
                ]
            )
        changes = _checked_device_fields(request.device, set(paths))
        async with self._db.tenant(tenant) as con:
            record = await store.update_device(con, tenant, device_id, changes)
        return convert.device(record)

    async def DecommissionDevice(
        self, request: devices_pb2.DecommissionDeviceRequest, context: Context
    ) -> devices_pb2.Device:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        async with self._db.tenant(tenant) as con:
            record = await store.decommission_device(con, tenant, device_id)
            revoked = await credentials.revoke_all(con, tenant, device_id)
        await self._mirror.revoked([DeviceIdentity(tenant, device_id, c) for c in revoked])
        return convert.device(record)

    async def CreateDeviceCredential(
        self, request: devices_pb2.CreateDeviceCredentialRequest, context: Context
    ) -> devices_pb2.DeviceCredential:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        expire_time = None
        if request.HasField("expire_time"):
            out: list[FieldViolation] = []
            v.check_expiry("expire_time", request.expire_time, out)
            v.raise_if(out)
            expire_time = request.expire_time.ToDatetime(tzinfo=UTC)
        secret = hashing.new_secret()
        secret_hash = await hashing.hashed(secret)
        credential_id = hashing.new_credential_id()
        async with self._db.tenant(tenant) as con:
            record = await credentials.create(
                con,
                tenant,
                device_id,
                credential_id=credential_id,
                secret_hash=secret_hash,
                expire_time=expire_time,
            )
            # Before the commit: if the broker cannot take it, nothing is stored.
            await self._mirror.created(DeviceIdentity(tenant, device_id, credential_id), secret)
        return convert.credential(tenant, record, secret=secret)

    async def ListDeviceCredentials(
        self, request: devices_pb2.ListDeviceCredentialsRequest, context: Context
    ) -> devices_pb2.ListDeviceCredentialsResponse:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        async with self._db.tenant(tenant, readonly=True) as con:
            records = await credentials.list_for_device(con, tenant, device_id)
        return devices_pb2.ListDeviceCredentialsResponse(
            credentials=[convert.credential(tenant, r) for r in records]
        )

    async def RevokeDeviceCredential(
        self, request: devices_pb2.RevokeDeviceCredentialRequest, context: Context
    ) -> devices_pb2.DeviceCredential:
        tenant = current_principal().tenant_id
        out: list[FieldViolation] = []
        v.check_id("device_id", request.device_id, out)
        if not hashing.CREDENTIAL_ID.fullmatch(request.credential_id):
            out.append(
                FieldViolation("credential_id", "must be the 12 hex digits a credential id has")
            )
        v.raise_if(out)
        async with self._db.tenant(tenant) as con:
            record = await credentials.revoke(con, tenant, request.device_id, request.credential_id)
        await self._mirror.revoked(
            [DeviceIdentity(tenant, request.device_id, request.credential_id)]
        )
        return convert.credential(tenant, record)

    async def CreateSite(
        self, request: devices_pb2.CreateSiteRequest, context: Context
    ) -> devices_pb2.Site:
        tenant = current_principal().tenant_id
        out: list[FieldViolation] = []
        v.check_id("site.site_id", request.site.site_id, out)
        v.check_text("site.name", request.site.name, v.NAME_MAX, out)
        v.raise_if(out)
        async with self._db.tenant(tenant) as con:
            record = await store.create_site(
                con, tenant, site_id=request.site.site_id, name=request.site.name
            )
        return convert.site(record)

    async def ListSites(
        self, request: devices_pb2.ListSitesRequest, context: Context
    ) -> devices_pb2.ListSitesResponse:
        tenant = current_principal().tenant_id
        size = page_size(request.page_size)
        listing = self._tokens.listing("sites", tenant)
        start = listing.start(request.page_token)
        async with self._db.tenant(tenant, readonly=True) as con:
            rows = await store.list_sites(
                con, tenant, after=str(start[0]) if start is not None else None, limit=size + 1
            )
        records, token = listing.page(rows, size, key=lambda s: [s.site_id])
        return devices_pb2.ListSitesResponse(
            sites=[convert.site(r) for r in records], next_page_token=token
        )
