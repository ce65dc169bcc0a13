"""Bad input: the right code, a message that says what is wrong, nothing written,
and the server keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pulse_client as pc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from pulse.device.v1 import devices_pb2, devices_pb2_grpc

from tests.conftest import Tenant


@pytest.fixture
async def stub(
    target: str, tenant: Tenant
) -> AsyncIterator[devices_pb2_grpc.DeviceRegistryServiceStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield devices_pb2_grpc.DeviceRegistryServiceStub(channel)


async def _invalid(call: object) -> pc.PulseError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    error = pc.from_rpc_error(info.value)
    assert isinstance(error, pc.InvalidArgument), error
    return error


def _md(tenant: Tenant) -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {tenant.token()}"),)


BAD_IDS = {
    "": "is required",
    "x" * 129: "at most 128",
    "DEV\x01CE": "not a valid id",
    "has space": "not a valid id",
    "-leading-dash": "not a valid id",
    "semi;colon": "not a valid id",
}


@pytest.mark.parametrize("bad_id", list(BAD_IDS))
async def test_bad_device_ids(
    stub: devices_pb2_grpc.DeviceRegistryServiceStub,
    tenant: Tenant,
    client: pc.AsyncPulseClient,
    bad_id: str,
) -> None:
    request = devices_pb2.CreateDeviceRequest(device=devices_pb2.Device(device_id=bad_id))
    error = await _invalid(stub.CreateDevice(request, metadata=_md(tenant)))
    assert error.field_violations[0].field == "device.device_id"
    assert BAD_IDS[bad_id] in error.field_violations[0].description
    get = stub.GetDevice(devices_pb2.GetDeviceRequest(device_id=bad_id), metadata=_md(tenant))
    assert (await _invalid(get)).field_violations[0].field == "device_id"
    assert [d async for d in client.devices.list()] == []


async def test_unknown_and_missing_update_mask_paths(
    stub: devices_pb2_grpc.DeviceRegistryServiceStub, tenant: Tenant, client: pc.AsyncPulseClient
) -> None:
    await client.devices.create("M-1", name="before")
    device = devices_pb2.Device(device_id="M-1", name="after", model="m")
    for paths in (["name", "lifecycle_status"], ["tenant_id"], []):
        request = devices_pb2.UpdateDeviceRequest(
            device=device, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        error = await _invalid(stub.UpdateDevice(request, metadata=_md(tenant)))
        assert error.field_violations[0].field.startswith("update_mask")
    unchanged = await client.devices.get("M-1")
    assert (unchanged.name, unchanged.model) == ("before", "")


async def test_too_many_tags_and_long_keys(client: pc.AsyncPulseClient) -> None:
    with pytest.raises(pc.InvalidArgument) as info:
        await client.devices.create("T-1", tags={f"k{n}": "" for n in range(65)})
    assert "at most 64" in info.value.message
    with pytest.raises(pc.InvalidArgument) as info:
        await client.devices.create("T-1", tags={"k" * 129: "v"})
    assert info.value.field_violations[0].field.startswith("device.tags")
    with pytest.raises(pc.InvalidArgument) as info:
        await client.devices.create("T-1", tags={"ok": "v" * 257})
    assert "at most 256" in info.value.message
    with pytest.raises(pc.NotFound):
        await client.devices.get("T-1")


async def test_oversized_and_deep_metadata(client: pc.AsyncPulseClient) -> None:
    with pytest.raises(pc.InvalidArgument) as info:
        await client.devices.create("BIG-1", metadata={"blob": "x" * 17_000})
    assert "at most 16384" in info.value.message
    deep: dict[str, pc.JsonValue] = {"leaf": 1}
    for _ in range(15):
        deep = {"n": deep}
    with pytest.raises(pc.InvalidArgument) as info:
        await client.devices.create("DEEP-1", metadata=deep)
    assert "nested deeper" in info.value.message
    await client.devices.create("OK-1", metadata={"fine": True})
    with pytest.raises(pc.InvalidArgument):
        await client.devices.update("OK-1", metadata={"blob": "x" * 17_000})
    assert (await client.devices.get("OK-1")).metadata == struct_pb2.Struct(
        fields={"fine": struct_pb2.Value(bool_value=True)}
    )


async def test_control_characters_in_names(client: pc.AsyncPulseClient) -> None:
    with pytest.raises(pc.InvalidArgument) as info:
        await client.devices.create("N-1", name="bad\x00name")
    assert "control characters" in info.value.message
    with pytest.raises(pc.InvalidArgument):
        await client.devices.create("N-1", name="n" * 257)
    with pytest.raises(pc.NotFound):
        await client.devices.get("N-1")
