"""The upstream web app's routes and JSON, through the HTTP gateway."""

from __future__ import annotations

import httpx

from server.db import Database
from tests.conftest import Tenant
from tests.groups.helpers import insert_rows, insert_sites, row

UPSTREAM_FILTER = {"status": "ONLINE", "tags": ["production"], "site_id": "site-01"}


def _auth(tenant: Tenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.token()}"}


async def test_upstream_routes(http: httpx.AsyncClient, tenant: Tenant, db: Database) -> None:
    h = _auth(tenant)
    await insert_sites(db, tenant.tenant_id, ["site-01"])
    await insert_rows(
        db,
        tenant.tenant_id,
        [
            row("DEV-1", site_id="site-01", tags={"production": ""}, name="Boiler"),
            row("DEV-2", site_id="site-01", tags={"production": ""}, status="OFFLINE"),
        ],
    )
    r = await http.post(
        "/customer/device-groups/dynamic",
        json={"name": "prod online", "query_filter": UPSTREAM_FILTER},
        headers=h,
    )
    assert r.status_code == 201, r.text
    group = r.json()
    assert (group["group_type"], group["version"], group["member_count"]) == ("dynamic", 1, 1)
    assert "etag" not in {k.lower() for k in r.headers}
    group_id = group["group_id"]

    r = await http.get("/customer/device-groups", headers=h)
    assert [(g["group_id"], g["member_count"]) for g in r.json()["groups"]] == [(group_id, 1)]

    r = await http.get(
        f"/customer/device-groups/{group_id}/members", params={"include_total": "true"}, headers=h
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "group_id": group_id,
        "group_type": "dynamic",
        "members": [
            {"device_id": "DEV-1", "name": "Boiler", "status": "ONLINE", "site_id": "site-01"}
        ],
        "total": 1,
        "next_page_token": "",
    }

    patch = {"query_filter": {"site_id": "site-01"}}
    url = f"/customer/device-groups/{group_id}/dynamic"
    # A FieldMask in a query parameter is in its proto3 JSON form: camelCase.
    mask = {"update_mask": "queryFilter"}
    r = await http.patch(url, params=mask, json=patch, headers={**h, "If-Match": '"1"'})
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["member_count"]) == (2, 2)
    r = await http.patch(
        url,
        params={"update_mask": "name", "expected_version": "1"},
        json={"name": "lost"},
        headers=h,
    )
    assert r.status_code == 409, r.text
    assert r.json()["error"]["details"][0]["metadata"]["current_version"] == "2"

    r = await http.post(
        "/customer/device-groups:preview",
        json={"query_filter": {"statuses": ["OFFLINE"]}, "include_total": True},
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert (r.json()["total"], [m["device_id"] for m in r.json()["members"]]) == (1, ["DEV-2"])

    r = await http.post(
        "/customer/device-groups/dynamic",
        json={
            "name": "bad",
            "query_filter": {"tag_selectors": [{"key": "env", "operator": "IN"}]},
        },
        headers=h,
    )
    assert r.status_code == 422, r.text  # upstream's path: upstream's status
    violations = next(d for d in r.json()["error"]["details"] if "field_violations" in d)
    assert (
        violations["field_violations"][0]["field"] == "group.query_filter.tag_selectors[0].values"
    )

    r = await http.delete(url, headers={**h, "If-Match": '"2"'})
    assert r.status_code == 200, r.text
    assert r.json() == {"group_id": group_id, "deleted": True}
    r = await http.get(f"/customer/device-groups/{group_id}", headers=h)
    assert r.status_code == 404
    r = await http.get("/customer/device-groups", headers=h)
    assert r.json()["groups"] == []


async def test_twin_filters_over_http(
    http: httpx.AsyncClient, tenant: Tenant, db: Database
) -> None:
    h = _auth(tenant)
    await insert_rows(
        db,
        tenant.tenant_id,
        [
            # Offline and behind: STALE.
            row("FW-OLD", status="OFFLINE", reported={"fw": {"version": "2.3.1"}, "temp": 41}),
            row("FW-NEW", status="OFFLINE", reported={"fw": {"version": "2.4.0"}, "temp": 39}),
        ],
    )
    query_filter = {
        "twin_conditions": [
            {"document": "REPORTED", "path": "fw.version", "operator": "LESS", "values": ["2.4"]},
            {"document": "REPORTED", "path": "temp", "operator": "GREATER", "values": [40.0]},
        ],
        # The spelling Twin.sync_status has in HTTP JSON is accepted too.
        "sync_statuses": ["stale", "SYNCED"],
        "desired_version": {"min": 0},
    }
    r = await http.post(
        "/customer/device-groups/dynamic",
        json={"name": "old and hot", "query_filter": query_filter},
        headers=h,
    )
    assert r.status_code == 201, r.text
    group = r.json()
    assert group["member_count"] == 1
    canonical = {k: group["query_filter"][k] for k in query_filter}
    assert canonical == {
        "twin_conditions": [
            {"document": "REPORTED", "path": "fw.version", "operator": "LESS", "values": ["2.4"]},
            {"document": "REPORTED", "path": "temp", "operator": "GREATER", "values": [40]},
        ],
        "sync_statuses": ["stale", "synced"],
        "desired_version": {"min": 0},
    }
    r = await http.get(f"/customer/device-groups/{group['group_id']}/members", headers=h)
    assert [m["device_id"] for m in r.json()["members"]] == ["FW-OLD"]
    r = await http.get("/customer/twin-paths", params={"document": "REPORTED"}, headers=h)
    assert r.json() == {"document": "REPORTED", "paths": ["fw.version", "temp"]}
    r = await http.get("/customer/devices/FW-OLD/groups", headers=h)
    assert [g["group_id"] for g in r.json()["groups"]] == [group["group_id"]]

    r = await http.post(
        "/customer/device-groups:preview",
        json={"query_filter": {"twin_conditions": [{"document": "REPORTED", "path": "a..b"}]}},
        headers=h,
    )
    assert r.status_code == 400, r.text
    fields = [
        v["field"] for d in r.json()["error"]["details"] for v in d.get("field_violations", [])
    ]
    assert fields == [
        "query_filter.twin_conditions[0].operator",
        "query_filter.twin_conditions[0].path",
    ]
