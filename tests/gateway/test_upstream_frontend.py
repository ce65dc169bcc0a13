"""The upstream platform's web app, replayed call by call against the gateway.

Each test sends what a phase-123 component of andrewcho-dev/opsconductor-pulse
sends (frontend/src/services/api/devices.ts: paths, headers, bodies) and
checks the fields that component reads, and that the stored state is what
the user meant. Paths use the `/api/v1` prefix of upstream's current
frontend; its older clients and tests use `/customer/...`, which
test_the_upstream_integration_workflow covers.
"""

from __future__ import annotations

from typing import Any

import httpx
import pulse_client as pc

from server.connectivity.model import Signal
from server.db import Database
from tests.conftest import Tenant
from tests.connectivity.conftest import emit, flap
from tests.groups.helpers import insert_rows, insert_sites, row
from tests.twin.test_delta_and_status import report

API = "/api/v1/customer"


def _headers(tenant: Tenant, **extra: str) -> dict[str, str]:
    """What the web app's getAuthHeaders() sends."""
    return {
        "Authorization": f"Bearer {tenant.token()}",
        "Content-Type": "application/json",
        **extra,
    }


def _detail(response: httpx.Response) -> str:
    """What lib/errors.ts shows in a toast: `body.detail` when it is a string."""
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail, response.text
    return detail


async def test_device_twin_panel(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    h = _headers(tenant)
    await client.devices.create("PUMP-1")
    await client.twin.update_desired("PUMP-1", {"mode": "eco"}, expected_version=0)
    await report(db, tenant.tenant_id, "PUMP-1", {"mode": "boost", "fw": "2.3"}, 1)
    await emit(db, tenant.tenant_id, ["PUMP-1"], Signal.ONLINE)

    # getDeviceTwin
    r = await http.get(f"{API}/devices/PUMP-1/twin", headers=h)
    assert r.status_code == 200, r.text
    twin = r.json()
    etag = r.headers["ETag"]
    assert etag == '"1"'
    assert twin["device_id"] == "PUMP-1"
    assert (twin["desired"], twin["reported"]) == ({"mode": "eco"}, {"mode": "boost", "fw": "2.3"})
    assert twin["delta"] == {"mode": "eco"}
    structured = twin["structured_delta"]
    assert structured["changed"] == {"mode": {"old_value": "boost", "new_value": "eco"}}
    assert (structured["added"], structured["removed"]) == ({}, {"fw": "2.3"})
    assert structured["unchanged_count"] == 0
    assert (twin["desired_version"], twin["reported_version"]) == (1, 1)
    # STATUS_BADGE[twin.sync_status] is keyed by the lower-case names.
    assert twin["sync_status"] in {"synced", "pending", "stale"}
    assert twin["sync_status"] == "pending"
    assert isinstance(twin["shadow_updated_at"], str)

    # updateDesiredState: the body is {"desired": ...}; the document stored
    # (and published to the device) is the inner object, not the wrapper.
    edited = {"mode": "boost", "fw": "2.3"}
    r = await http.patch(
        f"{API}/devices/PUMP-1/twin/desired",
        json={"desired": edited},
        headers={**h, "If-Match": etag},
    )
    assert r.status_code == 200, r.text
    saved = r.json()
    assert (saved["device_id"], saved["desired"], saved["desired_version"]) == (
        "PUMP-1",
        edited,
        2,
    )
    assert r.headers["ETag"] == '"2"'
    stored = await client.twin.get("PUMP-1")
    assert (pc.struct_to_dict(stored.desired), stored.desired_version) == (edited, 2)

    # loadTwin again: in sync now.
    twin = (await http.get(f"{API}/devices/PUMP-1/twin", headers=h)).json()
    assert twin["delta"] == {} and twin["structured_delta"]["unchanged_count"] == 2
    assert twin["sync_status"] == "pending"  # the device has not acknowledged version 2

    # Another user saved meanwhile: 409 -> ConflictError.
    r = await http.patch(
        f"{API}/devices/PUMP-1/twin/desired",
        json={"desired": {"mode": "eco"}},
        headers={**h, "If-Match": etag},
    )
    assert r.status_code == 409
    assert "version" in _detail(r)
    # No If-Match: 428 -> "Version header required".
    r = await http.patch(
        f"{API}/devices/PUMP-1/twin/desired", json={"desired": {"mode": "eco"}}, headers=h
    )
    assert r.status_code == 428
    _detail(r)
    # What upstream's model refuses with 422 is refused with 422 here.
    for body in ({"desired": "notadict"}, {"desired": [1, 2]}, {}, {"mode": "eco"}):
        r = await http.patch(
            f"{API}/devices/PUMP-1/twin/desired", json=body, headers={**h, "If-Match": '"2"'}
        )
        assert r.status_code == 422, (body, r.text)
        _detail(r)
    # A malformed If-Match is 400, as upstream answered it.
    r = await http.patch(
        f"{API}/devices/PUMP-1/twin/desired",
        json={"desired": {}},
        headers={**h, "If-Match": '"two"'},
    )
    assert r.status_code == 400
    _detail(r)
    stored = await client.twin.get("PUMP-1")
    assert (pc.struct_to_dict(stored.desired), stored.desired_version) == (edited, 2)

    r = await http.get(f"{API}/devices/NOPE/twin", headers=h)
    assert r.status_code == 404
    _detail(r)


async def test_device_connectivity_panel(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    h = _headers(tenant)
    await client.devices.create("PUMP-2")
    await flap(db, tenant.tenant_id, ["PUMP-2"], 60)  # 60 events

    # fetchDeviceConnections(deviceId, 50, 0)
    r = await http.get(f"{API}/devices/PUMP-2/connections?limit=50&offset=0", headers=h)
    assert r.status_code == 200, r.text
    first = r.json()
    assert (first["device_id"], first["total"], first["limit"], first["offset"]) == (
        "PUMP-2",
        60,
        50,
        0,
    )
    assert len(first["events"]) == 50
    for event in first["events"]:
        assert isinstance(event["id"], str)  # React keys, compared as strings
        assert event["event_type"] in {"CONNECTED", "DISCONNECTED", "CONNECTION_LOST"}
        assert event["timestamp"]
        # The panel prints details as "k: v"; upstream put the trigger there.
        assert event["details"]["trigger"] in {"status_online", "status_offline"}
        assert event["details"]["previous_status"]
    # "Load more": offset = offset + events.length.
    r = await http.get(f"{API}/devices/PUMP-2/connections?limit=50&offset=50", headers=h)
    more = r.json()
    assert (more["total"], more["offset"], len(more["events"])) == (60, 50, 10)
    ids = [e["id"] for e in first["events"] + more["events"]]
    assert len(set(ids)) == 60
    # Newest first, across both pages.
    stamps = [e["timestamp"] for e in first["events"] + more["events"]]
    assert stamps == sorted(stamps, reverse=True)

    # The default page is upstream's: 50.
    r = await http.get(f"{API}/devices/PUMP-2/connections", headers=h)
    assert (r.json()["limit"], len(r.json()["events"])) == (50, 50)

    for bad in ("limit=0", "limit=201", "offset=-1", "limit=x"):
        r = await http.get(f"{API}/devices/PUMP-2/connections?{bad}", headers=h)
        assert r.status_code == 422, (bad, r.text)
        _detail(r)
    r = await http.get(f"{API}/devices/NOPE/connections?limit=50&offset=0", headers=h)
    assert r.status_code == 404
    assert "NOPE" in _detail(r)


async def test_device_groups_page(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant, db: Database
) -> None:
    h = _headers(tenant, **{"X-CSRF-Token": "from-a-cookie"})
    await insert_sites(db, tenant.tenant_id, ["site-01"])
    await insert_rows(
        db,
        tenant.tenant_id,
        [row(f"DEV-{n:02}", site_id="site-01", tags={"production": ""}) for n in range(60)]
        + [row("OFF-1", status="OFFLINE")],
    )

    # createDynamicGroup, as the dialog builds it.
    r = await http.post(
        f"{API}/device-groups/dynamic",
        json={
            "name": "Online production",
            "query_filter": {"status": "ONLINE", "tags": ["production"], "site_id": "site-01"},
        },
        headers=h,
    )
    assert r.status_code == 201, r.text
    dynamic = r.json()
    assert dynamic["group_type"] == "dynamic" and dynamic["created_at"]
    # createDeviceGroup: a static group is a name and a description.
    r = await http.post(
        f"{API}/device-groups", json={"name": "Hand picked", "description": "pilot"}, headers=h
    )
    assert r.status_code == 201, r.text
    static = r.json()
    assert (static["group_type"], static["description"]) == ("static", "pilot")
    assert static["created_at"] and static["updated_at"]
    # A dynamic group needs its filter, as upstream's model required.
    r = await http.post(f"{API}/device-groups/dynamic", json={"name": "no filter"}, headers=h)
    assert r.status_code == 422
    assert "query_filter" in _detail(r)

    # fetchDeviceGroups (with a cache buster, which is ignored).
    r = await http.get(f"{API}/device-groups?_=1733030400000", headers=h)
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["total"] == 2
    by_name = {g["name"]: g for g in listing["groups"]}
    assert by_name["Online production"]["group_type"] == "dynamic"
    assert by_name["Online production"]["member_count"] == 60
    assert by_name["Hand picked"]["group_type"] == "static"
    for g in listing["groups"]:
        assert {"group_id", "name", "description", "member_count", "created_at"} <= g.keys()

    # fetchGroupMembersV2: every member (not a first page of 50), with the total.
    r = await http.get(f"{API}/device-groups/{dynamic['group_id']}/members", headers=h)
    members = r.json()
    assert (members["group_id"], members["group_type"], members["total"]) == (
        dynamic["group_id"],
        "dynamic",
        60,
    )
    assert len(members["members"]) == 60
    # The page shows "{member.name} - {member.status}".
    assert members["members"][0] == {
        "device_id": "DEV-00",
        "name": "",
        "status": "ONLINE",
        "site_id": "site-01",
    }

    # addGroupMember / removeGroupMember on the static group.
    gid = static["group_id"]
    for device_id in ("DEV-01", "OFF-1"):
        r = await http.put(f"{API}/device-groups/{gid}/devices/{device_id}", json={}, headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["action"] == "added"
    r = await http.get(f"{API}/device-groups/{gid}/devices", headers=h)
    assert [m["device_id"] for m in r.json()["members"]] == ["DEV-01", "OFF-1"]
    assert r.json()["total"] == 2
    r = await http.delete(f"{API}/device-groups/{gid}/devices/DEV-01", headers=h)
    assert (r.status_code, r.json()["device_id"], r.json()["action"]) == (200, "DEV-01", "removed")
    assert await client.groups.count_members(gid) == 1
    # A dynamic group takes no hand-picked members: a clear error, not a 500.
    r = await http.put(
        f"{API}/device-groups/{dynamic['group_id']}/devices/DEV-01", json={}, headers=h
    )
    assert r.status_code == 400
    assert "dynamic" in _detail(r)

    # updateDeviceGroup / updateDynamicGroup: no If-Match, as upstream sends.
    r = await http.patch(
        f"{API}/device-groups/{gid}", json={"name": "Pilot", "description": "v2"}, headers=h
    )
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["description"]) == ("Pilot", "v2")
    r = await http.patch(
        f"{API}/device-groups/{dynamic['group_id']}/dynamic", json={"name": "Online"}, headers=h
    )
    assert (r.status_code, r.json()["name"], r.json()["member_count"]) == (200, "Online", 60)
    r = await http.patch(f"{API}/device-groups/NO-SUCH", json={"name": "x"}, headers=h)
    assert r.status_code == 404
    _detail(r)

    # deleteDeviceGroup / deleteDynamicGroup
    r = await http.delete(f"{API}/device-groups/{gid}", headers=h)
    assert r.json() == {"group_id": gid, "deleted": True}
    r = await http.delete(f"{API}/device-groups/{dynamic['group_id']}/dynamic", headers=h)
    assert r.json() == {"group_id": dynamic["group_id"], "deleted": True}
    r = await http.get(f"{API}/device-groups", headers=h)
    assert r.json() == {"groups": [], "total": 0, "next_page_token": ""}


async def test_the_upstream_integration_workflow(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant
) -> None:
    """tests/integration/test_device_lifecycle.py::test_device_twin_desired_update_workflow
    of the upstream repository, on its `/customer/...` paths."""
    headers = {"Authorization": f"Bearer {tenant.token()}"}
    device_id = "test-device-a1"
    await client.devices.create(device_id)

    # 1) List devices (the device list itself is ours, not upstream's shape).
    list_resp = await http.get("/customer/devices?format=json", headers=headers)
    assert list_resp.status_code == 200
    assert [d["device_id"] for d in list_resp.json()["devices"]] == [device_id]

    # 2) Get twin delta to obtain an ETag (desired_version)
    delta_resp = await http.get(f"/customer/devices/{device_id}/twin/delta", headers=headers)
    assert delta_resp.status_code == 200
    etag = delta_resp.headers.get("ETag")
    assert etag == '"0"'
    delta: dict[str, Any] = delta_resp.json()
    assert delta["device_id"] == device_id and delta["delta"] == {}

    # 3) Update desired state using optimistic concurrency
    desired_resp = await http.patch(
        f"/customer/devices/{device_id}/twin/desired",
        headers={**headers, "If-Match": etag},
        json={"desired": {"integration_test": True}},
    )
    assert desired_resp.status_code == 200
    desired_data = desired_resp.json()
    assert desired_data.get("device_id") == device_id
    assert isinstance(desired_data.get("desired_version"), int)

    # 4) Verify ETag increments
    new_etag = desired_resp.headers.get("ETag")
    assert new_etag and new_etag != etag

    delta_resp2 = await http.get(f"/customer/devices/{device_id}/twin/delta", headers=headers)
    assert delta_resp2.status_code == 200
    assert delta_resp2.headers.get("ETag") == new_etag
    assert delta_resp2.json()["delta"] == {"integration_test": True}
    assert pc.struct_to_dict((await client.twin.get(device_id)).desired) == {
        "integration_test": True
    }
