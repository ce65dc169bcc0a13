"""The web console end to end, in a real headless Chromium driving the real
gateway, server, database and (for the timeline) evaluator and broker.

Screenshots land in test-artifacts/console/ for a person to look at. Where no
Chromium is installed these tests say so and skip; everything else still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator

import httpx
import pulse_client as pc
import pytest

from evaluator import handlers
from evaluator.runtime import Evaluator
from evaluator.simulator import SimulatedDevice
from server import config
from server.db import Database, create_pool
from server.mqtt_url import parse as parse_mqtt_url
from tests.conftest import Tenant
from tests.gateway.conftest import CHROMIUM, shot

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"
)

if CHROMIUM is not None:
    from playwright.async_api import Page, expect


async def test_filter_builder_previews_and_creates_a_dynamic_group(
    page: Page, client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await client.sites.create("plant-7")
    for n in range(6):
        await client.devices.create(
            f"PUMP-{n}", site_id="plant-7", tags={"env": "prod" if n < 4 else "dev"}
        )
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute(
            "UPDATE device_state SET status = 'ONLINE' WHERE device_id = ANY($1::text[])",
            ["PUMP-0", "PUMP-1", "PUMP-4"],
        )
    await page.goto(page.url.split("#")[0] + "#/groups")
    count = page.locator("#preview-count")
    await expect(count).to_have_text("6")
    await page.get_by_label("Name").fill("Online prod pumps")
    await page.get_by_label("ONLINE").check()
    await expect(count).to_have_text("3")
    await page.get_by_role("button", name="Add tag selector").click()
    await page.get_by_label("Tag key").fill("env")
    await page.get_by_label("Operator").select_option("EQUALS")
    await page.get_by_label("Tag values").fill("prod")
    await expect(count).to_have_text("2")
    await expect(page.locator("#preview tr")).to_have_count(2)
    await shot(page, "groups-builder")
    await page.get_by_role("button", name="Create dynamic group").click()
    await expect(page.get_by_role("link", name="Online prod pumps")).to_be_visible()
    await page.get_by_role("link", name="Online prod pumps").click()
    await expect(page.get_by_text("2 member(s)")).to_be_visible()
    await shot(page, "group-members")


async def test_filter_builder_takes_twin_conditions_and_sync_status(
    page: Page, client: pc.AsyncPulseClient, db: Database, tenant: Tenant, http: httpx.AsyncClient
) -> None:
    reported = {
        "FW-OLD": {"fw": {"version": 2.3}},
        "FW-NEW": {"fw": {"version": 2.4}},
        "FW-TEXT": {"fw": {"version": "2.3"}},  # a string never compares with a number
        "FW-NONE": {},
    }
    for device_id in reported:
        await client.devices.create(device_id)
    async with db.tenant(tenant.tenant_id) as con:
        for device_id, document in reported.items():
            await con.execute(
                "UPDATE device_state SET reported = $2 WHERE tenant_id = $1 AND device_id = $3",
                tenant.tenant_id,
                document,
                device_id,
            )
    await page.goto(page.url.split("#")[0] + "#/groups")
    count = page.locator("#preview-count")
    await expect(count).to_have_text("4")
    await page.get_by_label("Name").fill("Old firmware")
    await page.get_by_role("button", name="Add twin condition").click()
    path = page.get_by_label("Twin path")
    await expect(path).to_have_attribute("list", "twin-paths-REPORTED")
    # The picker offers the fleet's reported paths.
    await expect(page.locator("#twin-paths-REPORTED option[value='fw.version']")).to_have_count(1)
    await path.fill("fw.version")
    await page.get_by_label("Twin operator").select_option("LESS")
    await page.get_by_label("Twin value").fill("2.4")
    await expect(count).to_have_text("1")
    await expect(page.locator("#preview tr")).to_have_count(1)
    await expect(page.locator("#preview")).to_contain_text("FW-OLD")
    # "2.4" is the string: only the string version before it matches.
    await page.get_by_label("Twin value").fill('"2.4"')
    await expect(page.locator("#preview")).to_contain_text("FW-TEXT")
    await expect(count).to_have_text("1")
    await page.get_by_label("Twin value").fill("2.4")
    await expect(page.locator("#preview")).to_contain_text("FW-OLD")
    # Reported without desired, and not online: behind and STALE.
    await page.get_by_label("Sync status SYNCED").check()
    await expect(count).to_have_text("0")
    await page.get_by_label("Sync status STALE").check()
    await expect(count).to_have_text("1")
    await page.get_by_label("Twin document").select_option("DESIRED")
    await expect(path).to_have_attribute("list", "twin-paths-DESIRED")
    await expect(count).to_have_text("0")
    await page.get_by_label("Twin document").select_option("REPORTED")
    await expect(count).to_have_text("1")
    await shot(page, "groups-builder-twin")
    await page.get_by_role("button", name="Create dynamic group").click()
    await expect(page.get_by_role("link", name="Old firmware")).to_be_visible()
    headers = {"Authorization": f"Bearer {tenant.token()}"}
    r = await http.get("/customer/device-groups", headers=headers)
    (group,) = [g for g in r.json()["groups"] if g["name"] == "Old firmware"]
    r = await http.get(f"/customer/device-groups/{group['group_id']}", headers=headers)
    query_filter = r.json()["query_filter"]
    assert query_filter["twin_conditions"] == [
        {"document": "REPORTED", "path": "fw.version", "operator": "LESS", "values": [2.4]}
    ]
    assert query_filter["sync_statuses"] == ["stale", "synced"]  # Twin.sync_status's spelling
    await page.get_by_role("link", name="Old firmware").click()
    await expect(page.get_by_text("1 member(s)")).to_be_visible()


async def test_a_conflicting_desired_edit_is_shown_and_never_overwrites(
    page: Page, client: pc.AsyncPulseClient
) -> None:
    await client.devices.create("TWIN-1", name="Boiler")
    await client.twin.update_desired("TWIN-1", {"led": "off", "rate": 1}, expected_version=0)
    await page.goto(page.url.split("#")[0] + "#/devices/TWIN-1")
    await expect(page.locator("#desired-version")).to_have_text("1")
    await page.locator("#desired").fill('{"led": "on", "rate": 1}')
    # A second operator writes first.
    await client.twin.update_desired("TWIN-1", {"led": "off", "rate": 5}, expected_version=1)
    await page.get_by_role("button", name="Save desired state").click()
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("Someone else changed the desired state")
    await expect(alert).to_contain_text("rate")
    await shot(page, "twin-conflict")
    twin = await client.twin.get("TWIN-1")
    assert twin.desired_version == 2  # nothing overwritten
    assert twin.desired["rate"] == 5
    await page.get_by_role("button", name="Re-apply my edit on version 2").click()
    await expect(page.locator("#desired-version")).to_have_text("3")
    twin = await client.twin.get("TWIN-1")
    assert twin.desired["led"] == "on"
    await page.get_by_role("tab", name="Diff").click()
    await expect(page.get_by_role("table", name="Desired versus reported")).to_contain_text("led")
    await shot(page, "twin-diff")


@contextlib.asynccontextmanager
async def evaluator_running(
    settings: config.Settings, dsn: str, mqtt_url: str
) -> AsyncIterator[None]:
    db = Database(await create_pool(dsn, size=2))
    fast = dataclasses.replace(settings, sweep_interval_s=0.2, liveness_flush_s=0.05)
    broker = parse_mqtt_url(mqtt_url)
    evaluator = Evaluator(
        broker,
        handlers.build(db, broker, fast),
        client_id=f"console-test-{uuid.uuid4().hex[:8]}",
        session_expiry_s=30,
    )
    task = asyncio.create_task(evaluator.run())
    try:
        await asyncio.wait_for(evaluator.connected.wait(), 10)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await db.close()


async def test_connection_lost_appears_live_on_the_timeline(
    page: Page,
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    settings: config.Settings,
    dsn: str,
    mqtt_url: str,
) -> None:
    await client.devices.create("SIM-1", name="Simulated")
    async with evaluator_running(settings, dsn, mqtt_url):
        device = SimulatedDevice(mqtt_url, tenant.tenant_id, "SIM-1", heartbeat_s=1, keepalive_s=2)
        await device.start()
        try:
            await page.goto(page.url.split("#")[0] + "#/devices/SIM-1")
            await page.get_by_role("tab", name="Connectivity").click()
            timeline = page.locator("#timeline")
            await expect(timeline).to_contain_text("CONNECTED", timeout=15_000)
            await device.drop_connection()
            await expect(timeline).to_contain_text("CONNECTION_LOST", timeout=20_000)
            await expect(page.locator("#device-status")).to_contain_text("OFFLINE")
            await shot(page, "connectivity-timeline")
        finally:
            await device.stop()
