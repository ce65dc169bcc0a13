"""Twin, groups and connectivity over HTTP: the upstream platform's own
verification commands, version preconditions, and SSE resume."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pulse_client as pc

from server.connectivity.model import Signal
from server.db import Database
from tests.conftest import Tenant
from tests.connectivity.conftest import emit


def _auth(tenant: Tenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.token()}"}


async def test_the_upstream_verification_commands(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    h = _auth(tenant)
    await client.devices.create("DEVICE-01")
    await client.twin.update_desired(
        "DEVICE-01", {"led": "on", "cfg": {"rate": 2}}, expected_version=0
    )
    await emit(db, tenant.tenant_id, ["DEVICE-01"], Signal.ONLINE)

    r = await http.post(
        "/customer/device-groups/dynamic",
        json={"name": "Online Devices", "query_filter": {"status": "ONLINE"}},
        headers=h,
    )
    assert r.status_code == 201, r.text
    group = r.json()
    assert group["name"] == "Online Devices"
    assert group["group_id"]
    assert group["group_type"] == "dynamic"
    assert group["query_filter"]["statuses"] == ["ONLINE"]

    r = await http.get("/customer/devices/DEVICE-01/twin", headers=h)
    assert r.status_code == 200
    assert r.json()["desired_version"] == 1  # a JSON number, as upstream clients compare it
    assert r.headers["etag"] == '"1"'

    r = await http.get("/customer/devices/DEVICE-01/connections", params={"limit": 10}, headers=h)
    assert r.status_code == 200
    (event,) = r.json()["events"]
    assert {"id", "event_type", "timestamp", "details"} <= event.keys()
    assert event["event_type"] == "CONNECTED"

    r = await http.get("/customer/devices/DEVICE-01/twin/delta", headers=h)
    delta = r.json()
    assert delta["added"] == {"led": "on", "cfg": {"rate": 2}}
    assert delta["removed"] == {} and delta["changed"] == {}
    assert delta["in_sync"] is False

    r = await http.get(f"/customer/device-groups/{group['group_id']}/members", headers=h)
    members = r.json()
    assert members["group_type"] == "dynamic"
    assert [m["device_id"] for m in members["members"]] == ["DEVICE-01"]
    assert members["members"][0]["status"] == "ONLINE"


async def test_versions_etag_if_match_409_428(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    h = _auth(tenant)
    await client.devices.create("V-1")
    path = "/customer/devices/V-1/twin"

    r = await http.patch(f"{path}/desired", json={"desired": {"led": "on"}}, headers=h)
    assert r.status_code == 428, r.text
    assert r.json()["error"]["code"] == 428

    r = await http.patch(
        f"{path}/desired", json={"desired": {"led": "on"}}, headers={**h, "If-Match": '"0"'}
    )
    assert r.status_code == 200, r.text
    assert r.json()["desired_version"] == 1
    assert r.headers["etag"] == '"1"'

    r = await http.patch(
        f"{path}/desired", json={"desired": {"led": "off"}}, headers={**h, "If-Match": '"0"'}
    )
    assert r.status_code == 409
    error = r.json()["error"]
    info = next(d for d in error["details"] if d.get("reason"))
    assert info["reason"] == "VERSION_MISMATCH"
    assert info["metadata"]["current_version"] == "1"
    assert (await client.twin.get("V-1")).desired["led"] == "on"

    # The tag names the desired version, not the representation: the device
    # reports under the same version, so If-None-Match must not answer 304.
    current = (await http.get(path, headers=h)).headers["etag"]
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute(
            'UPDATE device_state SET reported = \'{"led": "on"}\', reported_version = 1 '
            "WHERE device_id = 'V-1'"
        )
    r = await http.get(path, headers={**h, "If-None-Match": current})
    assert r.status_code == 200
    assert r.json()["reported"] == {"led": "on"}
    assert r.headers["etag"] == current

    # Tags of earlier releases ("<version>-<digest>") still work as If-Match.
    r = await http.patch(
        f"{path}/desired", json={"desired": {"led": "off"}}, headers={**h, "If-Match": '"1-0a1b2c"'}
    )
    assert r.status_code == 200, r.text
    assert r.json()["desired_version"] == 2


async def _events(
    http: httpx.AsyncClient, headers: dict[str, str], want: int
) -> list[tuple[str, dict[str, Any]]]:
    """The first `want` events of a connections watch, as (id, message)."""
    out: list[tuple[str, dict[str, Any]]] = []
    async with http.stream(
        "GET", "/customer/connections:watch", params={"device_ids": ["SSE-1"]}, headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event_id = ""
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                message = json.loads(line[6:])
                if "event" in message:
                    out.append((event_id, message))
                    if len(out) == want:
                        return out
    return out


async def test_sse_resumes_from_last_event_id(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    h = _auth(tenant)
    await client.devices.create("SSE-1")
    first = asyncio.create_task(_events(http, h, 2))
    await asyncio.sleep(0.5)
    await emit(db, tenant.tenant_id, ["SSE-1"], Signal.ONLINE)
    await emit(db, tenant.tenant_id, ["SSE-1"], Signal.OFFLINE)
    got = await asyncio.wait_for(first, 15)
    assert [m["event"]["event_type"] for _, m in got] == ["CONNECTED", "DISCONNECTED"]
    resume_from = got[0][0]
    assert resume_from

    # The browser reconnects with Last-Event-ID: only what came after.
    await emit(db, tenant.tenant_id, ["SSE-1"], Signal.ONLINE)
    again = await asyncio.wait_for(_events(http, {**h, "Last-Event-ID": resume_from}, 2), 15)
    assert [m["event"]["event_type"] for _, m in again] == ["DISCONNECTED", "CONNECTED"]
    assert again[0][1]["event"]["id"] == got[1][1]["event"]["id"]


async def test_stream_errors_are_plain_http_errors(http: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await http.get("/customer/connections:watch")
    assert r.status_code == 401
    r = await http.get(
        "/customer/connections:watch", params={"resume_cursor": "garbage"}, headers=_auth(tenant)
    )
    assert r.status_code == 400


async def test_a_partial_twin_has_an_etag_only_with_its_version(
    client: pc.AsyncPulseClient, http: httpx.AsyncClient, tenant: Tenant
) -> None:
    await client.devices.create("P3")
    auth = {"authorization": f"Bearer {tenant.token()}"}
    versioned = await http.patch(
        "/customer/devices/P3/twin/desired",
        json={"desired": {"a": 1}, "expectedVersion": "0", "readMask": "desiredVersion"},
        headers=auth,
    )
    assert versioned.status_code == 200, versioned.text
    assert versioned.json() == {"desired_version": 1}
    assert versioned.headers["etag"] == '"1"'
    unversioned = await http.patch(
        "/customer/devices/P3/twin/desired",
        json={"desired": {"a": 2}, "expectedVersion": "1", "readMask": "revision"},
        headers=auth,
    )
    assert unversioned.status_code == 200, unversioned.text
    assert list(unversioned.json()) == ["revision"]
    assert "etag" not in unversioned.headers
