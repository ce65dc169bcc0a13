"""Twin conditions over what the evaluator stores: once a report is stored
(GetTwin shows it), the very next group read selects by it, with no index to
catch up; and sync status follows the device."""

from __future__ import annotations

import json
from typing import Any

import pulse_client as pc
from pulse_client import struct_to_dict

from server import wire
from tests.conftest import Tenant
from tests.groups.helpers import preview_ids, twin_condition
from tests.helpers import eventually
from tests.twin.conftest import EvaluatorFactory, mqtt_client


async def _report(
    mqtt: Any,
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    device_id: str,
    state: dict[str, Any],
    desired_version: int = 0,
) -> None:
    """A device's report, returning once the evaluator stored it."""
    payload = json.dumps({"state": state, "desired_version": desired_version}).encode()
    await mqtt.publish(wire.topic(tenant.tenant_id, device_id, "twin/reported"), payload, qos=1)

    async def stored() -> bool:
        return struct_to_dict((await client.twin.get(device_id)).reported) == state

    await eventually(stored, what=f"the report {state}")


async def test_a_committed_report_is_in_the_very_next_read(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
) -> None:
    await start_evaluator()
    for device_id in ("P-1", "P-2"):
        await client.devices.create(device_id)
    old = {"twin_conditions": [twin_condition("REPORTED", "fw.version", "LESS", "2.4")]}
    group = await client.groups.create_dynamic("old firmware", old)
    async with mqtt_client(mqtt_url) as mqtt:
        await _report(mqtt, client, tenant, "P-2", {"fw": {"version": "2.4.1"}})
        for version, members in (
            ("2.3.0", ["P-1"]),
            ("2.4.0", []),
            ("2.3.9", ["P-1"]),
            ("2.10.0", ["P-1"]),  # strings compare by code point: "2.10" < "2.4"
        ):
            await _report(mqtt, client, tenant, "P-1", {"fw": {"version": version}})
            # No waiting: membership is the stored twin, not an index of it.
            assert await preview_ids(client, old) == members, version
            listed = [m.device_id async for m in client.groups.members(group.group_id)]
            assert listed == members, version


async def test_sync_status_follows_the_device(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
) -> None:
    await start_evaluator()
    await client.devices.create("S-1")
    synced = {"sync_statuses": ["SYNCED"]}
    behind = {"sync_statuses": ["PENDING", "STALE"]}
    assert await preview_ids(client, synced) == ["S-1"]  # nothing asked, nothing reported
    await client.twin.update_desired("S-1", {"mode": "eco"}, expected_version=0)
    assert await preview_ids(client, synced) == []
    assert await preview_ids(client, behind) == ["S-1"]
    async with mqtt_client(mqtt_url) as mqtt:
        await _report(mqtt, client, tenant, "S-1", {"mode": "eco"}, desired_version=1)
    assert await preview_ids(client, synced) == ["S-1"]
    assert await preview_ids(client, behind) == []
    twin = await client.twin.get("S-1")
    assert twin.sync_status == twin.SYNCED
