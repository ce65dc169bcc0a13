"""GetTwin's delta and sync status, GetTwinDelta, and the sync client.

Reported state is arranged with the ingest store function the evaluator
uses (the MQTT path itself is covered in test_ingest.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from pulse.device.v1 import status_pb2, twin_pb2
from pulse_client import AsyncPulseClient, PulseClient, VersionConflict, struct_to_dict
from pytest import raises

from server.db import Database
from server.twin import store
from tests.conftest import Tenant
from tests.twin.conftest import create_devices

Twin = twin_pb2.Twin


async def report(
    db: Database, tenant_id: uuid.UUID, device_id: str, state: dict[str, Any], version: int
) -> str:
    async with db.tenant(tenant_id) as con:
        result = await store.ingest_reported(
            con, tenant_id, [store.Report(device_id, json.dumps(state), version)]
        )
    return result.outcomes[0]


async def set_connectivity(db: Database, tenant_id: uuid.UUID, device_id: str, status: str) -> None:
    async with db.tenant(tenant_id) as con:
        await con.execute(
            "UPDATE device_state SET status = $2 WHERE device_id = $1", device_id, status
        )


async def test_the_delta_is_structured_and_the_flat_one_kept(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "D1")
    desired: dict[str, Any] = {
        "led": "on",
        "net": {"wifi": "b", "mtu": 1500},
        "fan": None,
        "list": [1, 2],
    }
    await client.twin.update_desired("D1", desired, expected_version=0)
    reported = {"led": "on", "net": {"wifi": "a", "mtu": 1500, "ip": "10.0.0.2"}, "list": [1, 2]}
    assert await report(db, tenant.tenant_id, "D1", reported, 0) == store.APPLIED

    delta = await client.twin.get_delta("D1")
    assert dict(delta.added) == {"fan": delta.added["fan"]}
    assert delta.added["fan"].WhichOneof("kind") == "null_value"
    assert delta.removed["net/ip"].string_value == "10.0.0.2"
    change = delta.changed["net/wifi"]
    assert (change.old_value.string_value, change.new_value.string_value) == ("a", "b")
    assert set(delta.changed) == {"net/wifi"}
    assert delta.unchanged_count == 3  # led, net/mtu, list
    assert not delta.in_sync
    assert (delta.desired_version, delta.reported_version) == (1, 0)

    twin = await client.twin.get("D1")
    # The legacy form: top-level desired keys that differ, with desired values.
    legacy = {"fan": None, "net": {"wifi": "b", "mtu": 1500}}
    assert struct_to_dict(twin.delta) == legacy
    # GetTwinDelta names its device and carries the legacy form too; inside
    # a Twin, which has both itself, they stay empty.
    assert delta.device_id == "D1"
    assert struct_to_dict(delta.delta) == legacy
    delta.ClearField("device_id")
    delta.ClearField("delta")
    assert twin.structured_delta == delta


async def test_sync_status_follows_acknowledgement_connectivity_and_time(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "D1")
    await client.twin.update_desired("D1", {"mode": "eco"}, expected_version=0)
    # Never heard from (UNKNOWN): it will not catch up by itself.
    twin = await client.twin.get("D1")
    assert twin.connectivity_status == status_pb2.UNKNOWN
    assert twin.sync_status == Twin.STALE
    await set_connectivity(db, tenant.tenant_id, "D1", "ONLINE")
    assert (await client.twin.get("D1")).sync_status == Twin.PENDING
    # Acknowledged but reporting other values: still behind.
    await report(db, tenant.tenant_id, "D1", {"mode": "turbo"}, 1)
    twin = await client.twin.get("D1")
    assert (twin.reported_version, twin.sync_status) == (1, Twin.PENDING)
    # Behind for longer than the threshold (300 s by default).
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute(
            "UPDATE device_state SET desired_updated_at = now() - interval '301 seconds'"
        )
    assert (await client.twin.get("D1")).sync_status == Twin.STALE
    # Equal documents at the acknowledged version: synced, whatever else.
    await report(db, tenant.tenant_id, "D1", {"mode": "eco"}, 1)
    await set_connectivity(db, tenant.tenant_id, "D1", "OFFLINE")
    twin = await client.twin.get("D1")
    assert twin.sync_status == Twin.SYNCED and twin.structured_delta.in_sync
    # Same documents, but the device has not acknowledged the new version.
    await client.twin.update_desired("D1", {"mode": "eco"}, expected_version=1)
    await set_connectivity(db, tenant.tenant_id, "D1", "ONLINE")
    twin = await client.twin.get("D1")
    assert twin.structured_delta.in_sync and twin.sync_status == Twin.PENDING


async def test_the_sync_client_has_the_same_surface(
    client: AsyncPulseClient, tenant: Tenant, target: str
) -> None:
    await create_devices(client, "D1")

    # The server runs on this event loop, so blocking calls go to a thread.
    def blocking() -> None:
        with PulseClient.connect(target, token=tenant.token()) as sync:
            assert sync.twin.update_desired("D1", {"n": 1}, expected_version=0).desired_version == 1
            with raises(VersionConflict) as caught:
                sync.twin.update_desired("D1", {"n": 2}, expected_version=0)
            assert caught.value.current_version == 1
            sync.twin.patch_desired("D1", {"m": 1}, expected_version=1)

            def bump(doc: dict[str, Any]) -> None:
                doc["n"] += 1

            twin = sync.twin.modify_desired("D1", bump)
            assert (twin.desired_version, struct_to_dict(twin.desired)) == (3, {"n": 2, "m": 1})
            assert sync.twin.get("D1").desired_version == 3
            assert not sync.twin.get_delta("D1").in_sync
            with sync.twin.watch("D1") as stream:
                assert next(stream).desired_version == 3

    await asyncio.to_thread(blocking)
