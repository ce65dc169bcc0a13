"""Input a careless or hostile client sends: each answer is INVALID_ARGUMENT
(or PERMISSION_DENIED for a tenant that does not exist) naming what is wrong,
nothing is stored, and the server keeps serving."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pulse_client as pc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from pulse.device.v1 import (
    connectivity_pb2,
    connectivity_pb2_grpc,
    devices_pb2,
    devices_pb2_grpc,
    filter_pb2,
    groups_pb2,
    groups_pb2_grpc,
)
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server.db import Database
from tests.conftest import Tenant


@pytest.fixture
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield channel


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _error(call: object) -> pc.PulseError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return pc.from_rpc_error(info.value)


async def _device_count(db: Database, tenant: Tenant) -> int:
    async with db.tenant(tenant.tenant_id, readonly=True) as con:
        return int(await con.fetchval("SELECT count(*) FROM devices"))


def _metadata(build: str) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    if build == "nan":
        value.fields["reading"].number_value = float("nan")
    elif build == "infinity":
        value.fields["reading"].number_value = float("inf")
    elif build == "-infinity":
        value.fields["nested"].struct_value.fields["x"].number_value = float("-inf")
    elif build == "nul-in-string":
        value.fields["note"].string_value = "a\x00b"
    elif build == "nul-in-key":
        value.fields["no\x00te"].string_value = "x"
    elif build == "nul-in-list":
        value.fields["list"].list_value.values.add().string_value = "\x00"
    return value


@pytest.mark.parametrize(
    ("build", "says"),
    [
        ("nan", "finite"),
        ("infinity", "finite"),
        ("-infinity", "finite"),
        ("nul-in-string", "NUL"),
        ("nul-in-key", "NUL"),
        ("nul-in-list", "NUL"),
    ],
)
async def test_metadata_jsonb_cannot_hold_is_refused(
    channel: grpc.aio.Channel, tenant: Tenant, db: Database, build: str, says: str
) -> None:
    stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
    device = devices_pb2.Device(device_id="DEV-1", metadata=_metadata(build))
    error = await _error(
        stub.CreateDevice(
            devices_pb2.CreateDeviceRequest(device=device), metadata=_md(tenant.token())
        )
    )
    assert isinstance(error, pc.InvalidArgument), error
    assert error.field_violations[0].field == "device.metadata"
    assert says in error.field_violations[0].description
    assert await _device_count(db, tenant) == 0

    # And as an update of a device that exists: the stored metadata stays.
    await stub.CreateDevice(
        devices_pb2.CreateDeviceRequest(
            device=devices_pb2.Device(device_id="DEV-1", metadata=_metadata("none"))
        ),
        metadata=_md(tenant.token()),
    )
    update = devices_pb2.UpdateDeviceRequest(device=device)
    update.update_mask.paths.append("metadata")
    error = await _error(stub.UpdateDevice(update, metadata=_md(tenant.token())))
    assert isinstance(error, pc.InvalidArgument), error
    async with db.tenant(tenant.tenant_id, readonly=True) as con:
        assert await con.fetchval("SELECT metadata FROM devices WHERE device_id = 'DEV-1'") == {}


async def test_integral_metadata_numbers_are_stored_as_integers(
    client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    await client.devices.create("DEV-1", metadata={"setpoint": 21, "ratio": 0.5})
    async with db.tenant(tenant.tenant_id, readonly=True) as con:
        text = await con.fetchval("SELECT metadata::text FROM devices WHERE device_id = 'DEV-1'")
    assert text == '{"ratio": 0.5, "setpoint": 21}'


OUT_OF_RANGE = [
    ("year 0", timestamp_pb2.Timestamp(seconds=-62_135_596_801), "seconds"),
    ("year 10000", timestamp_pb2.Timestamp(seconds=253_402_300_800), "seconds"),
    ("nanos 2e9", timestamp_pb2.Timestamp(seconds=0, nanos=2_000_000_000), "nanos"),
    ("nanos -1", timestamp_pb2.Timestamp(seconds=0, nanos=-1), "nanos"),
]


@pytest.mark.parametrize(("name", "ts", "part"), OUT_OF_RANGE, ids=[o[0] for o in OUT_OF_RANGE])
@pytest.mark.parametrize("field", ["last_seen_before", "last_seen_after"])
async def test_out_of_range_filter_timestamps(
    channel: grpc.aio.Channel,
    tenant: Tenant,
    name: str,
    ts: timestamp_pb2.Timestamp,
    part: str,
    field: str,
) -> None:
    device_filter = filter_pb2.DeviceFilter()
    getattr(device_filter, field).CopyFrom(ts)
    stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
    error = await _error(
        stub.ListDevices(
            devices_pb2.ListDevicesRequest(filter=device_filter), metadata=_md(tenant.token())
        )
    )
    assert isinstance(error, pc.InvalidArgument), error
    assert error.field_violations[0].field == f"filter.{field}.{part}"
    groups = groups_pb2_grpc.DeviceGroupServiceStub(channel)
    error = await _error(
        groups.PreviewFilter(
            groups_pb2.PreviewFilterRequest(query_filter=device_filter),
            metadata=_md(tenant.token()),
        )
    )
    assert isinstance(error, pc.InvalidArgument), error


@pytest.mark.parametrize(("name", "ts", "part"), OUT_OF_RANGE, ids=[o[0] for o in OUT_OF_RANGE])
@pytest.mark.parametrize("field", ["start_time", "end_time"])
async def test_out_of_range_event_timestamps(
    channel: grpc.aio.Channel,
    tenant: Tenant,
    name: str,
    ts: timestamp_pb2.Timestamp,
    part: str,
    field: str,
) -> None:
    request = connectivity_pb2.ListConnectionEventsRequest()
    getattr(request, field).CopyFrom(ts)
    stub = connectivity_pb2_grpc.ConnectivityServiceStub(channel)
    error = await _error(stub.ListConnectionEvents(request, metadata=_md(tenant.token())))
    assert isinstance(error, pc.InvalidArgument), error
    assert error.field_violations[0].field == f"{field}.{part}"


def _nested_struct(depth: int) -> bytes:
    """A CreateDeviceRequest whose metadata nests `depth` Structs: built as
    bytes, since the Python runtime refuses to build it past its own limit."""
    inner = b""
    for _ in range(depth):
        value = b"\x2a" + _varint(len(inner)) + inner  # Value.struct_value (5)
        entry = b"\x0a\x01k" + b"\x12" + _varint(len(value)) + value  # key, value
        inner = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields (1)
    device = b"\x0a\x05DEV-1" + b"\x32" + _varint(len(inner)) + inner  # device_id, metadata (6)
    return b"\x0a" + _varint(len(device)) + device  # CreateDeviceRequest.device (1)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


UNDECODABLE = {
    "invalid UTF-8 in a string": b"\x0a\x04\x0a\x02\xff\xfe",
    "truncated": devices_pb2.CreateDeviceRequest(
        device=devices_pb2.Device(device_id="DEV-1", name="x" * 40)
    ).SerializeToString()[:-10],
    "garbage": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    "a Struct nested past the recursion limit": _nested_struct(200),
}


@pytest.mark.parametrize("payload", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
async def test_request_bytes_that_do_not_decode(
    channel: grpc.aio.Channel, tenant: Tenant, db: Database, payload: bytes
) -> None:
    raw = channel.unary_unary(
        "/pulse.device.v1.DeviceRegistryService/CreateDevice",
        request_serializer=None,
        response_deserializer=None,
    )
    error = await _error(raw(payload, metadata=_md(tenant.token())))
    assert isinstance(error, pc.InvalidArgument), error
    assert error.reason == "REQUEST_UNDECODABLE"
    assert "pulse.device.v1.CreateDeviceRequest" in error.message
    assert "Traceback" not in error.message
    assert await _device_count(db, tenant) == 0
    # Still serving.
    stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
    await stub.ListDevices(devices_pb2.ListDevicesRequest(), metadata=_md(tenant.token()))


async def test_a_token_for_a_tenant_that_does_not_exist(
    channel: grpc.aio.Channel, tenant: Tenant, db: Database
) -> None:
    ghost = Tenant(uuid.uuid4(), tenant.secret, tenant.audience)
    registry = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
    groups = groups_pb2_grpc.DeviceGroupServiceStub(channel)
    calls = [
        registry.CreateSite(
            devices_pb2.CreateSiteRequest(site=devices_pb2.Site(site_id="S1", name="s")),
            metadata=_md(ghost.token()),
        ),
        groups.CreateGroup(
            groups_pb2.CreateGroupRequest(group=groups_pb2.Group(group_id="G1", name="g")),
            metadata=_md(ghost.token()),
        ),
        registry.CreateDevice(
            devices_pb2.CreateDeviceRequest(device=devices_pb2.Device(device_id="DEV-1")),
            metadata=_md(ghost.token()),
        ),
        registry.ListDevices(devices_pb2.ListDevicesRequest(), metadata=_md(ghost.token())),
    ]
    for call in calls:
        error = await _error(call)
        assert isinstance(error, pc.PermissionDenied), error
        assert error.reason == ErrorReason.Name(ErrorReason.TENANT_NOT_FOUND)
        assert str(ghost.tenant_id) in error.message
    async with db.admin() as con:
        assert (
            await con.fetchval("SELECT count(*) FROM tenants WHERE tenant_id = $1", ghost.tenant_id)
            == 0
        )
    # The real tenant is unaffected.
    await registry.ListDevices(devices_pb2.ListDevicesRequest(), metadata=_md(tenant.token()))
