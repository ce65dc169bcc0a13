"""Bad input and other tenants: the right status naming what is wrong, and
nothing written."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import httpx
import pulse_client as pc
import pytest
from google.protobuf import json_format
from pulse.device.v1 import rollouts_pb2, rollouts_pb2_grpc
from pulse_client import AsyncPulseClient

from server.app import SERVICE_NAMES
from server.auth import Role
from server.db import Database
from server.gateway.serve import running_gateway
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.rollouts.conftest import EngineFactory
from tests.rollouts.helpers import State, desired, until_rollout
from tests.twin.conftest import create_devices

Rollout = rollouts_pb2.Rollout


@pytest.fixture
async def stub(target: str) -> AsyncIterator[rollouts_pb2_grpc.RolloutServiceAsyncStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield rollouts_pb2_grpc.RolloutServiceStub(channel)


async def _error(call: Awaitable[Any]) -> pc.PulseError:
    """What a raw stub's or the typed client's call failed with."""
    with pytest.raises((grpc.aio.AioRpcError, pc.PulseError)) as info:
        await call
    error = info.value
    if isinstance(error, grpc.aio.AioRpcError):
        return pc.from_rpc_error(error)
    assert isinstance(error, pc.PulseError)
    return error


def _md(tenant: Tenant, role: Role = Role.ADMIN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tenant.token(role)}"),)


def _rollout(**fields: Any) -> Rollout:
    """A valid rollout of group "g", changed by `fields` (JSON names)."""
    data: dict[str, Any] = {"targetGroupId": "g", "patch": {"fw": "2"}}
    data.update(fields)
    return json_format.ParseDict(data, Rollout())


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"k": value}
    return value


BAD: dict[str, tuple[Rollout, list[str]]] = {
    "no target": (
        json_format.ParseDict({"patch": {"a": 1}}, Rollout()),
        ["rollout.target_group_id"],
    ),
    "bad group id": (_rollout(targetGroupId="has space"), ["rollout.target_group_id"]),
    "bad filter": (
        json_format.ParseDict(
            {"targetFilter": {"tagSelectors": [{"key": "k"}]}, "patch": {"a": 1}}, Rollout()
        ),
        ["rollout.target_filter.tag_selectors[0].operator"],
    ),
    "no patch": (_rollout(patch=None), ["rollout.patch"]),
    "empty patch": (_rollout(patch={}), ["rollout.patch"]),
    "deep patch": (_rollout(patch=_deep(12)), ["rollout.patch"]),
    "huge patch": (_rollout(patch={"blob": "x" * 40_000}), ["rollout.patch"]),
    "negative rate": (_rollout(strategy={"maxPerMinute": -1}), ["rollout.strategy.max_per_minute"]),
    "canaries": (_rollout(strategy={"canaryCount": 10_001}), ["rollout.strategy.canary_count"]),
    "zero timeout": (
        _rollout(strategy={"deviceTimeout": "0s"}),
        ["rollout.strategy.device_timeout"],
    ),
    "long timeout": (
        _rollout(strategy={"deviceTimeout": f"{8 * 86400}s"}),
        ["rollout.strategy.device_timeout"],
    ),
    "threshold": (_rollout(abortThresholdPercent=101), ["rollout.abort_threshold_percent"]),
    "min count": (_rollout(abortMinCount=-3), ["rollout.abort_min_count"]),
    "failure path": (_rollout(failurePath="a..b"), ["rollout.failure_path"]),
    "output only": (
        _rollout(state="ABORTED", counts={"failed": 3}),
        ["rollout.state", "rollout.counts"],
    ),
    "everything": (
        _rollout(targetGroupId="", patch={}, strategy={"maxPerMinute": -5}),
        ["rollout.target_group_id", "rollout.patch", "rollout.strategy.max_per_minute"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_a_bad_rollout_is_refused_field_by_field_and_nothing_is_stored(
    case: str,
    stub: rollouts_pb2_grpc.RolloutServiceAsyncStub,
    client: AsyncPulseClient,
    tenant: Tenant,
) -> None:
    await client.groups.create_static("g", group_id="g")
    rollout, fields = BAD[case]
    error = await _error(
        stub.CreateRollout(rollouts_pb2.CreateRolloutRequest(rollout=rollout), metadata=_md(tenant))
    )
    assert isinstance(error, pc.InvalidArgument), error
    assert [v.field for v in error.field_violations] == fields
    assert [r async for r in client.rollouts.list()] == []


async def test_a_nan_in_the_patch_is_refused(
    stub: rollouts_pb2_grpc.RolloutServiceAsyncStub, client: AsyncPulseClient, tenant: Tenant
) -> None:
    rollout = _rollout(targetGroupId=None, targetFilter={})
    rollout.patch.fields["x"].number_value = float("nan")
    error = await _error(
        stub.CreateRollout(rollouts_pb2.CreateRolloutRequest(rollout=rollout), metadata=_md(tenant))
    )
    assert isinstance(error, pc.InvalidArgument)
    assert [v.field for v in error.field_violations] == ["rollout.patch"]


async def test_unknown_ids_and_states_that_do_not_allow_the_call(
    client: AsyncPulseClient, start_engine: EngineFactory
) -> None:
    error = await _error(client.rollouts.create(group_id="nope", patch={"a": 1}))
    assert isinstance(error, pc.NotFound) and error.reason == pc.ErrorReason.GROUP_NOT_FOUND
    error = await _error(client.rollouts.get("nope"))
    assert isinstance(error, pc.NotFound) and error.reason == pc.ErrorReason.ROLLOUT_NOT_FOUND
    error = await _error(client.rollouts.pause("nope"))
    assert isinstance(error, pc.NotFound)

    await create_devices(client, "U-1")
    rollout = await client.rollouts.create(filter={}, patch={"a": 1}, rollout_id="r1")
    error = await _error(client.rollouts.create(filter={}, patch={"a": 2}, rollout_id="r1"))
    assert isinstance(error, pc.AlreadyExists)
    assert error.reason == pc.ErrorReason.ROLLOUT_ALREADY_EXISTS
    error = await _error(client.rollouts.resume("r1"))
    assert isinstance(error, pc.FailedPrecondition)
    assert error.reason == pc.ErrorReason.ROLLOUT_STATE_CONFLICT
    assert error.metadata["state"] == "RUNNING"
    assert "only a PAUSED rollout can be resumed" in error.message
    await client.rollouts.cancel(rollout.rollout_id)
    for call in (client.rollouts.pause, client.rollouts.resume, client.rollouts.cancel):
        error = await _error(call("r1"))
        assert isinstance(error, pc.FailedPrecondition)
        assert error.metadata["state"] == "CANCELLED"
    # Cancelled before the engine saw it: nothing was written.
    await start_engine()
    assert await desired(client, "U-1") == ({}, 0)


async def test_a_viewer_reads_rollouts_but_cannot_start_or_stop_one(
    client: AsyncPulseClient, tenant: Tenant, connect: ClientFactory
) -> None:
    await create_devices(client, "V-1")
    rollout = await client.rollouts.create(filter={}, patch={"a": 1})
    viewer = await connect(tenant.token(Role.VIEWER))
    assert (await viewer.rollouts.get(rollout.rollout_id)).rollout_id == rollout.rollout_id
    for call in (
        viewer.rollouts.create(filter={}, patch={"a": 1}),
        viewer.rollouts.pause(rollout.rollout_id),
        viewer.rollouts.cancel(rollout.rollout_id),
    ):
        assert isinstance(await _error(call), pc.PermissionDenied)
    assert (await client.rollouts.get(rollout.rollout_id)).state == State.RUNNING


async def test_another_tenants_rollouts_do_not_exist_and_its_devices_are_never_written(
    client: AsyncPulseClient,
    make_tenant: TenantFactory,
    connect: ClientFactory,
    db: Database,
    start_engine: EngineFactory,
) -> None:
    other = await make_tenant()
    theirs = await connect(other.token())
    await create_devices(client, "I-1")
    await create_devices(theirs, "I-1")
    mine = await client.rollouts.create(filter={}, patch={"mine": True})
    await start_engine()
    await until_rollout(client, mine.rollout_id, lambda r: r.counts.applied == 1, what="the write")
    assert await desired(theirs, "I-1") == ({}, 0)
    for call in (
        theirs.rollouts.get(mine.rollout_id),
        theirs.rollouts.cancel(mine.rollout_id),
    ):
        assert isinstance(await _error(call), pc.NotFound)
    error = await _error(theirs.rollouts.list_devices(mine.rollout_id).__aiter__().__anext__())
    assert isinstance(error, pc.NotFound)
    assert [r async for r in theirs.rollouts.list()] == []
    # In the database itself: the other tenant's scope sees no rollout rows.
    async with db.tenant(other.tenant_id, readonly=True) as con:
        assert await con.fetchval("SELECT count(*) FROM rollouts") == 0
        assert await con.fetchval("SELECT count(*) FROM rollout_devices") == 0


async def test_listings_page_without_repeats(client: AsyncPulseClient) -> None:
    ids = [f"L-{n:02d}" for n in range(7)]
    await create_devices(client, *ids)
    made = [
        (await client.rollouts.create(filter={}, patch={"n": n}, rollout_id=f"r{n}")).rollout_id
        for n in range(5)
    ]
    pager = client.rollouts.list(page_size=2)
    pages = [[r.rollout_id for r in page] async for page in pager.pages]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == made[::-1]  # newest first
    devices = client.rollouts.list_devices("r0", page_size=3)
    assert [d.device_id async for d in devices] == ids


async def test_the_http_routes(target: str, tenant: Tenant, client: AsyncPulseClient) -> None:
    await create_devices(client, "H-1", "H-2")
    async with (
        running_gateway(target, SERVICE_NAMES, host="127.0.0.1", port=0) as port,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {tenant.token()}"},
            timeout=10,
        ) as http,
    ):
        r = await http.post(
            "/customer/rollouts",
            json={
                "target_filter": {},
                "patch": {"fw": "2"},
                "strategy": {"max_per_minute": 10, "device_timeout": "60s"},
                "abort_threshold_percent": 5,
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["state"] == "RUNNING"
        assert body["strategy"] == {
            "max_per_minute": 10,
            "canary_count": 0,
            "device_timeout": "60s",
        }
        assert body["counts"]["pending"] == 2
        rollout_id = body["rollout_id"]
        r = await http.get(f"/customer/rollouts/{rollout_id}/devices", params={"states": "PENDING"})
        assert [d["device_id"] for d in r.json()["devices"]] == ["H-1", "H-2"]
        r = await http.post(f"/customer/rollouts/{rollout_id}:pause", json={})
        assert r.json()["state"] == "PAUSED"
        r = await http.post(f"/customer/rollouts/{rollout_id}:pause", json={})
        assert r.status_code == 400
        assert r.json()["error"]["details"][0]["reason"] == "ROLLOUT_STATE_CONFLICT"
        r = await http.post("/customer/rollouts", content=json.dumps({"patch": {"a": 1}}))
        assert r.status_code == 400
        r = await http.get("/customer/rollouts", params={"target_group_id": "none"})
        assert r.json().get("rollouts", []) == []
