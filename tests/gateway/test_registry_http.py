"""The registry over HTTP/JSON: transcoding, errors, limits, OpenAPI."""

from __future__ import annotations

import httpx

from server.auth import Role
from tests.conftest import Tenant


def _auth(tenant: Tenant, role: Role = Role.ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.token(role)}"}


async def test_create_get_list_update_over_http(http: httpx.AsyncClient, tenant: Tenant) -> None:
    h = _auth(tenant)
    r = await http.post("/customer/sites", json={"site_id": "site-01", "name": "P1"}, headers=h)
    assert r.status_code == 200, r.text
    r = await http.post(
        "/customer/devices",
        json={"device_id": "DEVICE-01", "site_id": "site-01", "tags": {"production": ""}},
        headers=h,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["device_id"] == "DEVICE-01"
    assert body["connectivity_status"] == "UNKNOWN"
    assert body["tags"] == {"production": ""}

    r = await http.get("/customer/devices/DEVICE-01", headers=h)
    assert r.status_code == 200
    assert r.json()["site_id"] == "site-01"

    r = await http.patch(
        "/customer/devices/DEVICE-01",
        params={"update_mask": "name,model"},
        json={"name": "Boiler", "model": "bx", "site_id": "ignored-not-in-mask"},
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["model"]) == ("Boiler", "bx")
    assert r.json()["site_id"] == "site-01"

    # No update_mask: the fields sent are the mask (AIP-134).
    r = await http.patch("/customer/devices/DEVICE-01", json={"model": "bx-2"}, headers=h)
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["name"]) == ("bx-2", "Boiler")

    for n in range(2, 5):
        await http.post("/customer/devices", json={"device_id": f"DEVICE-0{n}"}, headers=h)
    r = await http.get("/customer/devices", params={"page_size": 3}, headers=h)
    page = r.json()
    assert [d["device_id"] for d in page["devices"]] == ["DEVICE-01", "DEVICE-02", "DEVICE-03"]
    r = await http.get(
        "/customer/devices",
        params={"page_size": 3, "page_token": page["next_page_token"]},
        headers=h,
    )
    assert [d["device_id"] for d in r.json()["devices"]] == ["DEVICE-04"]
    assert r.json()["next_page_token"] == ""

    # A filter through dotted query parameters, upstream shorthand included.
    r = await http.get(
        "/customer/devices",
        params=[("filter.site_id", "site-01"), ("filter.tags", "production")],
        headers=h,
    )
    assert [d["device_id"] for d in r.json()["devices"]] == ["DEVICE-01"]

    r = await http.post("/customer/devices/DEVICE-02:decommission", json={}, headers=h)
    assert r.json()["lifecycle_status"] == "DECOMMISSIONED"


async def test_errors_map_to_http_with_details(http: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await http.get("/customer/devices/NOPE-1")
    assert r.status_code == 401
    assert r.json()["error"]["status"] == "UNAUTHENTICATED"

    r = await http.get("/customer/devices/NOPE-1", headers=_auth(tenant))
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == 404
    assert error["details"][0]["reason"] == "DEVICE_NOT_FOUND"

    r = await http.post("/customer/devices", json={"device_id": "x" * 200}, headers=_auth(tenant))
    assert r.status_code == 400
    violations = next(d for d in r.json()["error"]["details"] if "field_violations" in d)
    assert violations["field_violations"][0]["field"] == "device.device_id"

    r = await http.post(
        "/customer/devices", json={"device_id": "V-1"}, headers=_auth(tenant, Role.VIEWER)
    )
    assert r.status_code == 403


async def test_malformed_requests_are_400_and_write_nothing(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    h = _auth(tenant)
    bad = [
        (b"{not json", "not valid JSON"),
        (b'{"device_id": "M-1", "unknown_field": 1}', "unknown_field"),
        (b'{"device_id": 42}', ""),
        (b"[1, 2]", ""),
    ]
    for payload, words in bad:
        r = await http.post(
            "/customer/devices", content=payload, headers={**h, "Content-Type": "application/json"}
        )
        assert r.status_code == 400, (payload, r.text)
        assert words in r.json()["error"]["message"]
    r = await http.get("/customer/devices", params={"page_size": "ten"}, headers=h)
    assert r.status_code == 400
    assert "page_size" in r.json()["error"]["message"]
    r = await http.get("/customer/devices", headers=h)
    assert r.json()["devices"] == []


async def test_oversized_body_is_413(http: httpx.AsyncClient, tenant: Tenant) -> None:
    big = {"device_id": "BIG-1", "metadata": {"blob": "x" * 70_000}}
    r = await http.post("/customer/devices", json=big, headers=_auth(tenant))
    assert r.status_code == 413
    assert "larger than" in r.json()["error"]["message"]
    r = await http.get("/customer/devices/BIG-1", headers=_auth(tenant))
    assert r.status_code == 404


async def test_unknown_paths_and_methods(http: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await http.get("/customer/nothing-here", headers=_auth(tenant))
    assert r.status_code == 404
    r = await http.delete("/customer/devices/X-1", headers=_auth(tenant))
    assert r.status_code == 405
    assert "GET" in r.headers["allow"]


async def test_cors_for_configured_origins_only(http: httpx.AsyncClient) -> None:
    preflight = {
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, if-match",
    }
    r = await http.options(
        "/customer/devices/X", headers={"Origin": "http://console.example", **preflight}
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://console.example"
    r = await http.options(
        "/customer/devices/X", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in r.headers


async def test_every_annotated_rpc_is_reachable_and_documented(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    from pulse.device.v1 import devices_pb2  # noqa: F401  (registers descriptors)

    from server.app import SERVICE_NAMES
    from server.gateway.routes import routes_for
    from server.gateway.serve import services

    doc = (await http.get("/openapi.json")).json()
    for route in routes_for(services(SERVICE_NAMES)):
        documented = route.template
        for _, field in route.variables:
            documented = documented.replace(field, field.rsplit(".", 1)[-1])
        assert route.http_method.lower() in doc["paths"][documented]
        path = route.template
        for _, field in route.variables:
            path = path.replace("{" + field + "}", "ANY-1")
        async with http.stream(
            route.http_method, path, headers=_auth(tenant), json={} if route.body else None
        ) as r:
            # Reached the service: any answer but the gateway's "no API here" and 5xx.
            assert r.status_code < 500, route.template
            if route.streaming and r.status_code == 200:
                assert r.headers["content-type"].startswith("text/event-stream")
                continue
            text = (await r.aread()).decode()
            assert "no API at" not in text, route.template
