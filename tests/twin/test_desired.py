"""Desired-state writes over real gRPC: versions, conflicts, preconditions,
merge patches, bad input, tenancy and roles."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pulse.device.v1 import twin_pb2
from pulse_client import (
    AsyncPulseClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    VersionConflict,
    struct_to_dict,
)

from server.auth import Role
from server.db import Database
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.twin.conftest import create_devices

SYNCED = twin_pb2.Twin.SYNCED


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        doc = {"n": doc}
    return doc


async def test_a_new_device_has_an_empty_synced_twin(client: AsyncPulseClient) -> None:
    await create_devices(client, "D1")
    twin = await client.twin.get("D1")
    assert (twin.device_id, twin.desired_version, twin.reported_version) == ("D1", 0, 0)
    assert struct_to_dict(twin.desired) == {} and struct_to_dict(twin.reported) == {}
    assert twin.sync_status == SYNCED
    assert twin.structured_delta.in_sync
    assert not twin.HasField("desired_update_time")


async def test_each_write_with_the_read_version_adds_exactly_one(
    client: AsyncPulseClient,
) -> None:
    await create_devices(client, "D1")
    first = await client.twin.update_desired(
        "D1", {"setpoint": 21, "mode": "eco"}, expected_version=0
    )
    assert first.desired_version == 1
    assert first.HasField("desired_update_time")
    second = await client.twin.update_desired("D1", {"setpoint": 22.5}, expected_version=1)
    assert second.desired_version == 2
    # The whole document is replaced, and integers stay integers.
    read = await client.twin.get("D1")
    assert read.desired_version == 2
    assert struct_to_dict(read.desired) == {"setpoint": 22.5}
    assert read.revision > first.revision


async def test_a_stale_version_fails_with_the_current_one(client: AsyncPulseClient) -> None:
    await create_devices(client, "D1")
    await client.twin.update_desired("D1", {"a": 1}, expected_version=0)
    await client.twin.update_desired("D1", {"a": 2}, expected_version=1)
    with pytest.raises(VersionConflict) as caught:
        await client.twin.update_desired("D1", {"a": "lost?"}, expected_version=1)
    error = caught.value
    assert error.reason == "VERSION_MISMATCH"
    assert error.current_version == 2
    assert error.metadata["expected_version"] == "1"
    assert error.precondition_violations[0].subject == "devices/D1/twin"
    twin = await client.twin.get("D1")
    assert (twin.desired_version, struct_to_dict(twin.desired)) == (2, {"a": 2})
    # A version from the future is just as stale.
    with pytest.raises(VersionConflict):
        await client.twin.update_desired("D1", {"a": 3}, expected_version=7)


async def test_a_write_without_a_version_needs_force(client: AsyncPulseClient) -> None:
    await create_devices(client, "D1")
    with pytest.raises(FailedPrecondition) as caught:
        await client.twin.update_desired("D1", {"a": 1})
    assert caught.value.reason == "PRECONDITION_REQUIRED"
    assert not isinstance(caught.value, VersionConflict)
    with pytest.raises(FailedPrecondition) as caught:
        await client.twin.patch_desired("D1", {"a": 1})
    assert caught.value.reason == "PRECONDITION_REQUIRED"
    assert (await client.twin.get("D1")).desired_version == 0
    forced = await client.twin.update_desired("D1", {"a": 1}, force=True)
    assert forced.desired_version == 1
    forced = await client.twin.patch_desired("D1", {"b": 2}, force=True)
    assert (forced.desired_version, struct_to_dict(forced.desired)) == (2, {"a": 1, "b": 2})
    # An explicit version wins over force.
    with pytest.raises(VersionConflict):
        await client.twin.update_desired("D1", {}, expected_version=0, force=True)


async def test_merge_patch_applies_under_the_version_check(client: AsyncPulseClient) -> None:
    await create_devices(client, "D1")
    await client.twin.update_desired(
        "D1", {"led": "on", "net": {"wifi": "a", "dns": ["1.1.1.1"]}, "old": 1}, expected_version=0
    )
    patch = {"net": {"wifi": "b", "dns": ["9.9.9.9"]}, "old": None, "new": True}
    twin = await client.twin.patch_desired("D1", patch, expected_version=1)
    assert twin.desired_version == 2
    assert struct_to_dict(twin.desired) == {
        "led": "on",
        "net": {"wifi": "b", "dns": ["9.9.9.9"]},
        "new": True,
    }
    with pytest.raises(VersionConflict) as caught:
        await client.twin.patch_desired("D1", {"led": "off"}, expected_version=1)
    assert caught.value.current_version == 2
    assert struct_to_dict((await client.twin.get("D1")).desired)["led"] == "on"


async def test_unknown_and_foreign_devices_are_not_found(
    client: AsyncPulseClient, make_tenant: TenantFactory, connect: ClientFactory
) -> None:
    other = await connect((await make_tenant()).token(Role.ADMIN))
    await create_devices(other, "THEIRS")
    for device_id in ("NOPE", "THEIRS"):
        calls = [
            client.twin.get(device_id),
            client.twin.get_delta(device_id),
            client.twin.update_desired(device_id, {"a": 1}, expected_version=0),
            client.twin.update_desired(device_id, {"a": 1}, force=True),
            client.twin.patch_desired(device_id, {"a": 1}, expected_version=0),
        ]
        for call in calls:
            with pytest.raises(NotFound) as caught:
                await call
            assert caught.value.reason == "DEVICE_NOT_FOUND"
    assert (await other.twin.get("THEIRS")).desired_version == 0


async def test_a_decommissioned_device_keeps_its_twin_but_refuses_writes(
    client: AsyncPulseClient,
) -> None:
    await create_devices(client, "D1")
    await client.twin.update_desired("D1", {"a": 1}, expected_version=0)
    await client.devices.decommission("D1")
    for call in [
        client.twin.update_desired("D1", {"a": 2}, expected_version=1),
        client.twin.patch_desired("D1", {"a": 2}, expected_version=1),
    ]:
        with pytest.raises(FailedPrecondition) as caught:
            await call
        assert caught.value.reason == "DEVICE_DECOMMISSIONED"
    twin = await client.twin.get("D1")
    assert (twin.desired_version, struct_to_dict(twin.desired)) == (1, {"a": 1})


BAD_DOCUMENTS = {
    "too large": ({"blob": "x" * (32 * 1024)}, "bytes as JSON"),
    "too deep": (nested(11), "nested deeper than 10"),
    "NaN": ({"x": float("nan")}, "finite"),
    "infinity": ({"x": [float("inf")]}, "finite"),
    "NUL in a value": ({"x": "a\x00b"}, "NUL"),
    "NUL in a key": ({"a\x00": 1}, "NUL"),
}
# (Protobuf strings are UTF-8, so lone surrogates cannot even be sent over
# gRPC; the MQTT tests cover them.)


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
async def test_bad_documents_are_refused_and_nothing_is_written(
    client: AsyncPulseClient, db: Database, tenant: Tenant, case: str
) -> None:
    await create_devices(client, "D1")
    await client.twin.update_desired("D1", {"keep": True}, expected_version=0)
    document, description = BAD_DOCUMENTS[case]
    with pytest.raises(InvalidArgument) as caught:
        await client.twin.update_desired("D1", document, expected_version=1)
    [violation] = caught.value.field_violations
    assert violation.field == "desired" and description in violation.description
    with pytest.raises(InvalidArgument) as caught:
        await client.twin.patch_desired("D1", document, expected_version=1)
    [violation] = caught.value.field_violations
    assert violation.field == "patch" and description in violation.description
    twin = await client.twin.get("D1")
    assert (twin.desired_version, struct_to_dict(twin.desired)) == (1, {"keep": True})
    async with db.admin() as con:
        queued = await con.fetchval(
            "SELECT count(*) FROM twin_outbox WHERE tenant_id = $1", tenant.tenant_id
        )
    assert queued == 1  # the one good write


async def test_the_limits_apply_to_the_merged_document(client: AsyncPulseClient) -> None:
    await create_devices(client, "D1")
    half = "x" * (17 * 1024)
    await client.twin.update_desired("D1", {"a": half}, expected_version=0)
    with pytest.raises(InvalidArgument) as caught:
        await client.twin.patch_desired("D1", {"b": half}, expected_version=1)
    assert caught.value.field_violations[0].field == "patch"
    # Deleting while adding keeps it within the limit.
    twin = await client.twin.patch_desired("D1", {"a": None, "b": half}, expected_version=1)
    assert twin.desired_version == 2 and set(struct_to_dict(twin.desired)) == {"b"}
    # Exactly at the limit is fine.
    envelope = len(json.dumps({"b": ""}, separators=(",", ":")))
    exact = {"b": "y" * (32 * 1024 - envelope)}
    assert (await client.twin.update_desired("D1", exact, expected_version=2)).desired_version == 3
    assert (
        await client.twin.update_desired("D1", nested(10), expected_version=3)
    ).desired_version == 4


async def test_bad_requests_name_their_fields(client: AsyncPulseClient) -> None:
    await create_devices(client, "D1")
    with pytest.raises(InvalidArgument) as caught:
        await client.twin.update_desired("D1", {}, expected_version=-1)
    assert caught.value.field_violations[0].field == "expected_version"
    with pytest.raises(InvalidArgument) as caught:
        await client.twin.get("bad id!")
    assert caught.value.field_violations[0].field == "device_id"
    with pytest.raises(InvalidArgument):
        await client.twin.update_desired("", {}, expected_version=0)


async def test_viewers_read_and_operators_write(
    client: AsyncPulseClient, tenant: Tenant, connect: ClientFactory
) -> None:
    await create_devices(client, "D1")
    viewer = await connect(tenant.token(Role.VIEWER))
    operator = await connect(tenant.token(Role.OPERATOR))
    assert (await viewer.twin.get("D1")).desired_version == 0
    assert (await viewer.twin.get_delta("D1")).in_sync
    for call in [
        viewer.twin.update_desired("D1", {"a": 1}, expected_version=0),
        viewer.twin.patch_desired("D1", {"a": 1}, expected_version=0),
    ]:
        with pytest.raises(PermissionDenied):
            await call
    assert (
        await operator.twin.update_desired("D1", {"a": 1}, expected_version=0)
    ).desired_version == 1
