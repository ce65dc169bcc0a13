"""Groups over the twin: conditions on reported and desired values, sync
status and versions, agreeing with the reference evaluation, never stale
(a stored report or desired write is visible to the very next read), and
refused with field violations when malformed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pulse_client as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pulse.device.v1 import filter_pb2, groups_pb2, groups_pb2_grpc

from server import config, filters
from server.auth import Role, mint_token
from server.db import Database
from server.tenants import ensure_tenant
from tests.conftest import Tenant
from tests.groups.helpers import (
    filter_message,
    insert_rows,
    insert_sites,
    preview_ids,
    remove_devices,
    row,
    twin_condition,
)
from tests.unit.filter_strategies import (
    SITE_IDS,
    TwinSpec,
    device_rows,
    twin_condition_dict,
    twin_specs,
)


@pytest.fixture
async def viewer(
    settings: config.Settings, target: str
) -> AsyncIterator[tuple[list[str], pc.AsyncPulseClient]]:
    """A client whose token names the tenant last put in the list."""
    tenants: list[str] = [""]

    def token() -> str:
        return mint_token(
            settings.secret,
            tenant_id=uuid.UUID(tenants[-1]),
            role=Role.VIEWER,
            audience=settings.jwt_audience,
        )

    client = await pc.AsyncPulseClient.connect(target, token=token)
    try:
        yield tenants, client
    finally:
        await client.close()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(device_rows(), unique_by=lambda r: r.device_id, min_size=1, max_size=15),
    conditions=st.lists(twin_specs(), min_size=1, max_size=2),
    sync=st.lists(st.sampled_from(["SYNCED", "PENDING", "STALE"]), max_size=2),
    data=st.data(),
)
async def test_twin_conditions_select_exactly_what_the_reference_selects(
    rows: list[filters.DeviceRow],
    conditions: list[TwinSpec],
    sync: list[str],
    data: st.DataObject,
    db: Database,
    viewer: tuple[list[str], pc.AsyncPulseClient],
) -> None:
    tenants, client = viewer
    tenant_id = uuid.uuid4()
    async with db.admin() as con:
        await ensure_tenant(con, tenant_id, "twin property")
    await insert_sites(db, tenant_id, SITE_IDS)
    await insert_rows(db, tenant_id, rows)
    try:
        tenants.append(str(tenant_id))

        draw = cast(st.DrawFn, data.draw)
        spec: dict[str, Any] = {
            "include_decommissioned": True,
            "twin_conditions": [twin_condition_dict(draw, c) for c in conditions],
        }
        if sync:
            spec["sync_statuses"] = sync
        parsed = filters.parse_filter(spec)
        expected = sorted(r.device_id for r in rows if filters.matches(parsed, r))
        assert await preview_ids(client, spec) == expected
    finally:
        await remove_devices(db, tenant_id)


async def test_a_desired_write_is_in_the_very_next_read(
    client: pc.AsyncPulseClient, tenant: Tenant
) -> None:
    for device_id in ("W-1", "W-2"):
        await client.devices.create(device_id)
    target = {"twin_conditions": [twin_condition("DESIRED", "fw.target", "EQUALS", "2.4.1")]}
    pending = {"sync_statuses": ["PENDING", "STALE"], "desired_version": {"min": "1"}}
    group = await client.groups.create_dynamic("rolling out", target)
    twin = await client.twin.update_desired("W-1", {"fw": {"target": "2.4.1"}}, expected_version=0)
    assert [m.device_id async for m in client.groups.members(group.group_id)] == ["W-1"]
    # Never reported and not online: behind, and not catching up by itself.
    assert await preview_ids(client, pending) == ["W-1"]
    await client.twin.update_desired(
        "W-1", {"fw": {"target": "2.5"}}, expected_version=twin.desired_version
    )
    assert [m.device_id async for m in client.groups.members(group.group_id)] == []


async def test_list_devices_takes_twin_conditions(
    client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    for device_id in ("L-1", "L-2", "L-3"):
        await client.devices.create(device_id)
    async with db.tenant(tenant.tenant_id) as con:
        for device_id, reported in (
            ("L-1", {"temp": 41, "mode": "eco"}),
            ("L-2", {"temp": "41", "mode": "boost"}),
            ("L-3", {"temp": 39.5}),
        ):
            await con.execute(
                "UPDATE device_state SET reported = $2 WHERE tenant_id = $1 AND device_id = $3",
                tenant.tenant_id,
                reported,
                device_id,
            )
    hot = filter_message({"twin_conditions": [twin_condition("REPORTED", "temp", "GREATER", 40)]})
    assert [d.device_id async for d in client.devices.list(filter=hot)] == ["L-1"]
    not_eco = filter_message(
        {"twin_conditions": [twin_condition("REPORTED", "mode", "NOT_EQUALS", "eco")]}
    )
    assert [d.device_id async for d in client.devices.list(filter=not_eco)] == ["L-2", "L-3"]
    typed = filter_message({"twin_conditions": [twin_condition("REPORTED", "temp", "IN", "41")]})
    assert [d.device_id async for d in client.devices.list(filter=typed)] == ["L-2"]


@pytest.fixture
async def stub(target: str) -> AsyncIterator[groups_pb2_grpc.DeviceGroupServiceAsyncStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield groups_pb2_grpc.DeviceGroupServiceStub(channel)


async def test_bad_twin_conditions_are_field_violations_and_create_nothing(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    stub: groups_pb2_grpc.DeviceGroupServiceAsyncStub,
) -> None:
    bad = filter_pb2.DeviceFilter(
        twin_conditions=[
            filter_pb2.TwinCondition(
                document=filter_pb2.TwinCondition.REPORTED,
                path="fw..version",
                operator=filter_pb2.TwinCondition.LESS,
            ),
            filter_pb2.TwinCondition(path="a\\x", operator=filter_pb2.TwinCondition.EQUALS),
        ]
    )
    bad.twin_conditions[0].values.add().bool_value = True
    bad.twin_conditions[1].values.add().number_value = float("nan")
    bad.twin_conditions[1].values.add().string_value = "two values"

    def request() -> groups_pb2.CreateGroupRequest:
        return groups_pb2.CreateGroupRequest(group=groups_pb2.Group(name="bad", query_filter=bad))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateGroup(request(), metadata=[("authorization", f"Bearer {tenant.token()}")])
    error = pc.from_rpc_error(info.value)
    assert isinstance(error, pc.InvalidArgument)
    assert {v.field: v.description for v in error.field_violations} == {
        "group.query_filter.twin_conditions[1].values[0]": "must be a finite number"
    }
    bad.twin_conditions[1].values[0].number_value = 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateGroup(request(), metadata=[("authorization", f"Bearer {tenant.token()}")])
    error = pc.from_rpc_error(info.value)
    assert isinstance(error, pc.InvalidArgument)
    fields = {v.field: v.description for v in error.field_violations}
    prefix = "group.query_filter.twin_conditions"
    assert fields == {
        f"{prefix}[0].path": "empty key before index 3; keys are separated by one dot",
        f"{prefix}[0].values[0]": "LESS compares a number or a string, got boolean",
        f"{prefix}[1].document": "is required",
        f"{prefix}[1].path": (
            "unknown escape at index 1: only \\. (a dot) and \\\\ (a backslash) are escapes"
        ),
        f"{prefix}[1].values": "EQUALS takes exactly one value, got 2",
    }
    assert [g async for g in client.groups.list()] == []


async def test_twin_paths_list_what_the_fleet_reports(
    client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    await insert_rows(
        db,
        tenant.tenant_id,
        [
            row("A", reported={"fw": {"version": "2.4"}, "list": [{"x": 1}], "a.b": 1}),
            row("B", reported={"fw": {"build": 7, "empty": {}}, "mode": "eco"}),
            row("C", desired={"fw": {"target": "2.5"}}),
        ],
    )
    assert await client.groups.twin_paths("REPORTED") == [
        "a\\.b",
        "fw.build",
        "fw.empty",
        "fw.version",
        "list",
        "mode",
    ]
    assert await client.groups.twin_paths("DESIRED") == ["fw.target"]
    with pytest.raises(pc.InvalidArgument):
        await client.groups.twin_paths("DOCUMENT_UNSPECIFIED")
