"""Twin conditions over what the evaluator stores: once a report is stored
(GetTwin shows it), the very next group read selects by it, with no index to
catch up; and sync status follows the device."""

from __future__ import annotations

import json
from typing import Any

import pulse_client as pc
from google.protobuf import json_format
from pulse.device.v1 import filter_pb2
from pulse_client import struct_to_dict

from server import wire
from tests.conftest import Tenant
from tests.helpers import eventually
from tests.twin.conftest import EvaluatorFactory, mqtt_client


def _condition(document: str, path: str, operator: str, *values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"document": document, "path": path, "operator": operator}
    if values:
        out["values"] = list(values)
    return out


async def _preview(client: pc.AsyncPulseClient, data: dict[str, Any]) -> list[str]:
    message = json_format.ParseDict(data, filter_pb2.DeviceFilter())
    return [m.device_id async for m in client.groups.preview(message, page_size=1000)]


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
    old = {"twin_conditions": [_condition("REPORTED", "fw.version", "LESS", "2.4")]}
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
            assert await _preview(client, old) == members, version
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
    assert await _preview(client, synced) == ["S-1"]  # nothing asked, nothing reported
    await client.twin.update_desired("S-1", {"mode": "eco"}, expected_version=0)
    assert await _preview(client, synced) == []
    assert await _preview(client, behind) == ["S-1"]
    async with mqtt_client(mqtt_url) as mqtt:
        await _report(mqtt, client, tenant, "S-1", {"mode": "eco"}, desired_version=1)
    assert await _preview(client, synced) == ["S-1"]
    assert await _preview(client, behind) == []
    twin = await client.twin.get("S-1")
    assert twin.sync_status == twin.SYNCED
